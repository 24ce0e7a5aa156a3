"""Dagster resources: the typed, configurable handles assets use for storage, faces and editing."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import PrivateAttr

from flen_assets.project import Project
from flen_resources.editors import Editor, get_editor
from flen_resources.faces import FaceAnalyzer
from flen_resources.lineage import LineageStore
from flen_resources.storage import DvcStore


class ProjectResource(dg.ConfigurableResource):
    """The project folder: DVC-versioned data, lineage store and staging area."""

    project_dir: str = ""  # empty: $FLEN_PROJECT_DIR or the folder holding workspace.yaml

    @property
    def project(self) -> Project:
        return Project(Path(self.project_dir).resolve()) if self.project_dir else Project.discover()

    @property
    def lineage(self) -> LineageStore:
        return LineageStore(self.project.lineage_dir)

    @property
    def dvc(self) -> DvcStore:
        return DvcStore(self.project)


class FaceResource(dg.ConfigurableResource):
    """face_recognition settings: `hog` on CPU, `cnn` with a CUDA build of dlib."""

    model: Literal["hog", "cnn"] = "hog"
    upsample: int = 1
    num_jitters: int = 1
    max_side: int = 1024
    _analyzer: FaceAnalyzer | None = PrivateAttr(default=None)

    @property
    def analyzer(self) -> FaceAnalyzer:
        if self._analyzer is None:
            self._analyzer = FaceAnalyzer(self.model, self.upsample, self.num_jitters, self.max_side)
        return self._analyzer


class EditorResource(dg.ConfigurableResource):
    """Which editor backend enrichment uses; GPU backends hold the `gpu` pool while they run."""

    backend: str = "classic"

    def get(self) -> Editor:
        return get_editor(self.backend)

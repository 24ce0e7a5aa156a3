"""Dagster resources: the typed, configurable handles assets use for storage, faces and editing."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import PrivateAttr

from flen_resources.editors import Editor, get_editor
from flen_resources.faces import FaceAnalyzer
from flen_resources.lineage import LineageStore
from flen_resources.project import Project
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
    """The editor backends enrichment can use, and how the Qwen-Image-Edit one loads.

    Model and LoRA sources: a hub id (`org/name`, LoRAs `org/repo/file.safetensors`), a local
    path, or the embedded tiny pack (`tiny`, `tiny:<lora>`). The defaults run the tiny pack;
    set FLEN_QWEN_EDIT_MODEL (or this resource's config) to Qwen/Qwen-Image-Edit-2509 for real edits.
    """

    qwen_model: str = "tiny"
    qwen_quantization: Literal["none", "nf4"] = "none"  # nf4: transformer + text encoder in 4 bit (GPU)
    device: str = "auto"  # auto: the GPU when there is one
    qwen_output_area: int = 0  # pixels of an edit; 0: 1024x1024, or 256x256 on the tiny pack
    qwen_loras: dict[str, str] = {"angles": "tiny:angles", "lightning-8step": "tiny:lightning-8step",
                                  "lightning-4step": "tiny:lightning-4step"}
    _editors: dict = PrivateAttr(default_factory=dict)

    def get(self, backend: str) -> Editor:
        """The editor registered as `backend` (classic, qwen_edit), created once per process."""
        if backend not in self._editors:
            if backend == "qwen_edit":
                from flen_resources.editors.qwen_edit import QwenEditEditor

                area = self.qwen_output_area or (256 * 256 if self.qwen_model == "tiny" else 1024 * 1024)
                self._editors[backend] = QwenEditEditor(model=self.qwen_model, quantization=self.qwen_quantization,
                                                        device=self.device, loras=self.qwen_loras, output_area=area)
            else:
                self._editors[backend] = get_editor(backend)
        return self._editors[backend]


class GeneratorResource(dg.ConfigurableResource):
    """FLUX.1-dev text-to-image with the character LoRA (used by evaluation and synthetic batches)."""

    flux_model: str = "tiny"
    flux_quantization: Literal["none", "nf4"] = "none"
    device: str = "auto"
    _generator: object = PrivateAttr(default=None)

    def get(self):
        """The FluxGenerator, created once per process."""
        if self._generator is None:
            from flen_resources.generators.flux import FluxGenerator

            self._generator = FluxGenerator(model=self.flux_model, quantization=self.flux_quantization, device=self.device)
        return self._generator


class TrainerResource(dg.ConfigurableResource):
    """The LoRA trainers (FLUX.1-dev on training sets, Qwen-Image-Edit on edit triplets).

    Run folders (cache, checkpoints, outputs) live under the project's state folder, so a killed
    materialization resumes from its last checkpoint when it is launched again.
    """

    flux_model: str = "tiny"
    qwen_model: str = "tiny"

    def flux(self, work_dir: Path, log=print):
        """A FluxLoraTrainer for one run folder."""
        from flen_resources.trainers.flux_lora import FluxLoraTrainer

        return FluxLoraTrainer(model=self.flux_model, work_dir=work_dir, log=log)

    def qwen_edit(self, work_dir: Path, log=print):
        """A QwenEditLoraTrainer for one run folder."""
        from flen_resources.trainers.qwen_edit_lora import QwenEditLoraTrainer

        return QwenEditLoraTrainer(model=self.qwen_model, work_dir=work_dir, log=log)

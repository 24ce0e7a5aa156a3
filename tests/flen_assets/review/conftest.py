"""Fixtures for the review page: a project with a gated partition, and a real server on a free port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flen_resources.project import Project
from tests_helpers import build_review_partition, running_server


@pytest.fixture
def review_project(project: Project) -> tuple[Project, list[str]]:
    """A project with 40 pending images of bench|v1 (filtered_images), distances 0.2..0.6."""
    ids = build_review_partition(project, 40)
    return project, ids


@pytest.fixture
def review_server(review_project) -> Iterator[tuple[str, Project, list[str]]]:
    project, ids = review_project
    with running_server(project) as url:
        yield url, project, ids

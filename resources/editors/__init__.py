"""Editor backends: each turns source image(s) plus an edit request into a new image."""

from flen_resources.editors.base import EditJob, Editor, EditRequest, EditResult, UnknownEditorError, get_editor

__all__ = ["EditJob", "EditRequest", "EditResult", "Editor", "UnknownEditorError", "get_editor"]

"""Editor backends: each turns source image(s) plus an edit request into a new image."""

from flen_resources.editors.base import Editor, EditRequest, EditResult, UnknownEditorError, get_editor

__all__ = ["EditRequest", "EditResult", "Editor", "UnknownEditorError", "get_editor"]

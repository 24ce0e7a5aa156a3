"""Model sources: a Hugging Face hub id, a local folder, or the embedded tiny pack.

A source string is one of:
- `tiny`                     the embedded tiny pack for the model (built offline on first use);
- a folder path              a pipeline saved with `save_pretrained` (./x, /x, ~/x or an existing path);
- `org/name` or `org/name@revision`   a hub repository, read from the huggingface_hub cache
  (HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE are respected) and downloaded there when allowed.
Only safetensors weights are ever loaded; pickle formats are refused before any load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from flen_resources.models.registry import MODELS, ModelSpec, release_flags

PICKLE_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"}
# What a pipeline needs from a hub repository: configs, tokenizers and safetensors weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*/tokenizer*", "*.jinja"]


class ModelNotAvailable(RuntimeError):
    """The model cannot be found here; the message says how to get it."""


class ModelFolderError(ValueError):
    """A model folder that is incomplete or holds refused (pickle) weights; names the file."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model source turned into a local folder, with what lineage records about it."""

    key: str  # registry key, e.g. qwen-image-edit-2509
    source: str  # as configured
    kind: Literal["hub", "folder", "tiny"]
    path: Path
    model_id: str  # hub id, folder name or tiny/<key>
    revision: str  # hub commit, or a content hash of the folder's configs and weight list

    @property
    def ref(self) -> str:
        """`model_id@revision`, the string recorded in lineage."""
        return f"{self.model_id}@{self.revision[:12]}"


def models_dir() -> Path:
    """Where FLENwheel keeps its own model files (the tiny pack): $FLEN_MODELS_DIR or ~/.cache/flenwheel/models."""
    env = os.environ.get("FLEN_MODELS_DIR")
    if env:
        return Path(env).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "flenwheel" / "models"


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def missing_model_message(spec: ModelSpec, source: str, reason: str) -> str:
    """One clear first line: which model, why it is missing, which setting to change (what `flen` prints);
    then how to fetch it on a connected machine (the run's log, `flen --debug`)."""
    from huggingface_hub import constants

    hub_id = source.split("@")[0] if "/" in source and not _looks_like_path(source) else spec.hub_id
    lines = [
        f"model {hub_id} ({spec.key}, about {spec.size_gb:.0f} GB) is not available here: {reason}; "
        f"point {spec.setting} at a downloaded copy (a pipeline folder, or a hub id in the HF cache: "
        f"`hf download {hub_id}`), or set {spec.setting}=tiny for the tiny test pack",
        f"  Hugging Face cache searched: {constants.HF_HUB_CACHE}"
        + (" (HF_HUB_OFFLINE=1: no download tried)" if constants.HF_HUB_OFFLINE else ""),
        "  On a machine that reaches huggingface.co:",
    ]
    if spec.gated:
        lines.append(f"    accept the licence at https://huggingface.co/{hub_id}, then `hf auth login`")
    lines += [
        f"    hf download {hub_id} --include '*.json' '*.safetensors' '*.txt' '*.model' 'tokenizer*'",
        "  then copy its hub cache folder (models--" + hub_id.replace("/", "--") + ") into this machine's "
        "HF cache, or save the pipeline to a folder and use that folder as the model source.",
        "  For the offline demo and tests use the embedded tiny pack: model source `tiny` (`flen models tiny`).",
    ]
    return "\n".join(lines)


def folder_revision(path: Path) -> str:
    """A content hash of a model folder's configs and weight file names and sizes (cheap, stable)."""
    h = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file() and not file.name.startswith("."):
            rel = file.relative_to(path).as_posix()
            h.update(rel.encode())
            if file.suffix == ".json":
                h.update(file.read_bytes())
            else:
                h.update(str(file.stat().st_size).encode())
    return h.hexdigest()


def check_pipeline_folder(path: Path) -> None:
    """Refuse pickle weights and incomplete folders before diffusers reads anything."""
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelFolderError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
    try:
        components = json.loads(index.read_text())
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for a binary file
        raise ModelFolderError(f"{index} is not valid JSON: {exc}") from exc
    for name, value in components.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        folder = path / name
        if not folder.is_dir():
            raise ModelFolderError(f"incomplete model folder {path}: component folder '{name}/' is missing")
        pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
        weights = sorted(folder.glob("*.safetensors"))
        if pickles and not weights:
            raise ModelFolderError(
                f"{folder}: only pickle weights ({', '.join(pickles)}); FLENwheel loads safetensors only "
                "(pickles can run code when loaded). Convert them to .safetensors first.")
        for shard_index in folder.glob("*.safetensors.index.json"):
            try:
                shards = set(json.loads(shard_index.read_text()).get("weight_map", {}).values())
            except (ValueError, AttributeError) as exc:  # not JSON, or not an object
                raise ModelFolderError(f"incomplete model folder {folder}: weight index {shard_index.name} "
                                       f"is not valid: {exc}") from exc
            missing = sorted(s for s in shards if not (folder / s).is_file())
            if missing:
                raise ModelFolderError(f"incomplete model folder {folder}: missing weight shard(s) {', '.join(missing)}")
        if (folder / "config.json").is_file() and not weights and not list(folder.glob("*.index.json")):
            raise ModelFolderError(f"incomplete model folder {folder}: config.json but no .safetensors weights")


def check_release(spec: ModelSpec, path: Path) -> None:
    """Refuse a folder whose transformer is another release of the same pipeline (2509 given as 2511, say):
    they load alike, so nothing else would notice."""
    config_file = path / "transformer" / "config.json"
    wanted = release_flags(spec.key)
    if not wanted or not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ModelFolderError(f"{config_file} is not valid JSON: {exc}") from exc
    found = {flag: bool(config.get(flag, False)) for flag in wanted}
    if found != wanted:
        other = next((m.key for m in MODELS.values() if m.pipeline == spec.pipeline and release_flags(m.key) == found),
                     "another release")
        raise ModelFolderError(
            f"{path} holds {other} (transformer {', '.join(f'{k}={v}' for k, v in found.items())}), not {spec.key}: "
            f"point {spec.setting} at a {spec.hub_id} folder or hub id")


def resolve_model(key: str, source: str, allow_download: bool = True) -> ResolvedModel:
    """Turn a model source string into a checked local folder, or raise ModelNotAvailable."""
    if key not in MODELS:
        raise KeyError(f"unknown model {key!r}; known: {', '.join(MODELS)}")
    spec = MODELS[key]
    source = source.strip()
    if source == "tiny":
        from flen_resources.models.tiny_pack import ensure_tiny_pack

        path = ensure_tiny_pack() / key
        check_pipeline_folder(path)
        check_release(spec, path)
        return ResolvedModel(key, source, "tiny", path, f"tiny/{key}", folder_revision(path))
    if _looks_like_path(source):
        path = Path(source).expanduser().resolve()
        if not path.is_dir():
            raise ModelNotAvailable(missing_model_message(spec, spec.hub_id, f"folder {path} does not exist"))
        check_pipeline_folder(path)
        check_release(spec, path)
        return ResolvedModel(key, source, "folder", path, path.name, folder_revision(path))
    repo_id, _, revision = source.partition("@")
    path = _hub_snapshot(spec, repo_id, revision or None, allow_download)
    check_pipeline_folder(path)
    check_release(spec, path)
    return ResolvedModel(key, source, "hub", path, repo_id, path.name)


def _hub_snapshot(spec: ModelSpec, repo_id: str, revision: str | None, allow_download: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    local_only = constants.HF_HUB_OFFLINE or not allow_download
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                      local_files_only=local_only))
    except LocalEntryNotFoundError as exc:
        reason = "it is not in the Hugging Face cache" + ("" if local_only else " and the hub could not be reached")
        raise ModelNotAvailable(missing_model_message(spec, repo_id, reason)) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelNotAvailable(missing_model_message(spec, repo_id, f"download failed ({type(exc).__name__}: {exc})")) from exc

"""LoRA files: resolve, inspect (architecture and key style) without loading, refuse pickles."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from flen_resources.imaging import sha256_file
from flen_resources.models.registry import LORAS, MODELS, lora_mismatch
from flen_resources.models.sources import PICKLE_SUFFIXES, ModelNotAvailable

ARCH_OF_PIPELINE = {"QwenImageEditPlusPipeline": "qwen-image", "FluxPipeline": "flux"}


class LoraError(ValueError):
    """A LoRA that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file with what lineage records about it."""

    name: str
    path: Path
    sha256: str
    architecture: str  # qwen-image | flux | unknown
    key_style: str  # diffusers | comfyui | kohya | lightx2v
    rank: int
    n_tensors: int

    def record(self, weight: float) -> dict:
        """The dict stored in lineage for this LoRA at `weight`."""
        return {"name": self.name, "file": self.path.name, "sha256": self.sha256, "weight": weight,
                "key_style": self.key_style, "rank": self.rank}


def detect_architecture(keys: list[str]) -> str:
    """qwen-image, flux or unknown, from module names (no tensors read)."""
    text = "\n".join(keys)
    if re.search(r"single_transformer_blocks|single_blocks|double_blocks|lora_unet_single|lora_transformer_single", text):
        return "flux"
    if re.search(r"img_mlp|txt_mlp|img_mod|txt_mod", text):
        return "qwen-image"
    blocks = [int(m) for m in re.findall(r"transformer_blocks[._](\d+)", text)]
    if blocks:  # attention-only LoRAs: FLUX has 19 double blocks, Qwen-Image 60
        return "qwen-image" if max(blocks) >= 19 else "unknown"
    return "unknown"


def detect_key_style(keys: list[str]) -> str:
    """The naming convention of a LoRA's keys."""
    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    if any(".lora_down." in k for k in keys):
        return "lightx2v"
    return "diffusers"


def inspect_lora(path: Path, name: str | None = None) -> LoraFile:
    """Read a LoRA's header (never its pickles: only .safetensors is opened)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(f"LoRA {path.name}: {path.suffix} is a pickle format, refused (it can run code when "
                        "loaded); use a .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise LoraError(f"LoRA {path.name}: expected a .safetensors file")
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            rank = 0
            for key in keys:
                if key.endswith(("lora_A.weight", "lora_down.weight")):
                    rank = fh.get_slice(key).get_shape()[0]
                    break
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise LoraError(f"LoRA {path.name} is not a readable safetensors file: {exc}") from exc
    if not any("lora" in k for k in keys):
        raise LoraError(f"LoRA {path.name} holds no LoRA tensors (no lora_A/lora_B or lora_down/lora_up keys)")
    return LoraFile(name=name or path.stem, path=path, sha256=sha256_file(path), architecture=detect_architecture(keys),
                    key_style=detect_key_style(keys), rank=int(rank), n_tensors=len(keys))


def resolve_lora(name: str, source: str, model_key: str, allow_download: bool = True) -> LoraFile:
    """A LoRA source (`tiny:<name>`, a .safetensors path, or `org/repo/path/file.safetensors` on the hub)
    turned into a checked local file that fits `model_key`."""
    why = lora_mismatch(name, model_key)
    if why:  # a registered LoRA of another release: the same architecture, so no load would notice
        raise LoraError(why)
    if source.startswith("tiny:"):
        from flen_resources.models.tiny_pack import ensure_tiny_pack

        path = ensure_tiny_pack() / "loras" / f"{source.removeprefix('tiny:')}.safetensors"
        if not path.is_file():
            raise LoraError(f"the tiny pack has no LoRA {source!r}")
    elif source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        path = Path(source).expanduser().resolve()
    else:
        path = _hub_lora(name, source, allow_download)
    info = inspect_lora(path, name)
    wanted = ARCH_OF_PIPELINE[MODELS[model_key].pipeline]
    if info.architecture not in (wanted, "unknown"):
        raise LoraError(f"LoRA {path.name} is a {info.architecture} LoRA; it cannot be applied to "
                        f"{MODELS[model_key].hub_id} ({wanted})")
    return info


def _hub_lora(name: str, source: str, allow_download: bool) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    parts = source.split("/")
    if len(parts) < 3:
        raise LoraError(f"LoRA source {source!r}: expected a .safetensors path, tiny:<name>, or org/repo/file.safetensors")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=constants.HF_HUB_OFFLINE or not allow_download))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        spec = LORAS.get(name)
        raise ModelNotAvailable(
            f"LoRA {name} ({repo_id}/{filename}) is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"could not be downloaded here ({type(exc).__name__}). On a connected machine: "
            f"`hf download {repo_id} '{filename}'`, then copy the cache or point the LoRA at the file."
            + (f" ({spec.note})" if spec else "")) from exc

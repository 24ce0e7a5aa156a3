"""Checkpoints of a LoRA run: checkpoints/step-NNNNNN/ with the LoRA weights, the optimizer and
LR-scheduler states and the step.

Steps draw their randomness from (seed, step) alone (batching.py), so nothing else is needed to
resume exactly. All of it is safetensors + JSON (no pickles: a checkpoint from elsewhere cannot
run code), written to a temp folder and renamed into place, so a kill never leaves a checkpoint
that looks complete and is not.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def save_checkpoint(folder: Path, step: int, lora_state: dict[str, torch.Tensor], optimizer: Any, lr_scheduler: Any,
                    extra: dict[str, Any], keep: int) -> Path:
    """checkpoints/step-NNNNNN/ written atomically; older ones beyond `keep` are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):  # half-written by a run that was killed: never a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    final = folder / f"step-{step:06d}"
    # A folder, not a file, is renamed into place: flen_resources.atomic covers single files only.
    tmp = folder / f".tmp-{step:06d}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in lora_state.items()}, str(tmp / "lora.safetensors"))
    opt_tensors, opt_meta = _split_optimizer_state(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({
        "step": step, "optimizer": opt_meta, "lr_scheduler": lr_scheduler.state_dict(), **extra,
    }, default=str))
    for file in tmp.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (half-written ones are temp folders, never matched)."""
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def checkpoint_config(path: Path) -> dict:
    """The config a checkpoint was saved with (its state.json's), before anything is restored from it."""
    return json.loads((path / "state.json").read_text()).get("config") or {}


def load_checkpoint(path: Path, optimizer: Any, lr_scheduler: Any,
                    device: torch.device) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Restore optimizer and scheduler; returns (step, LoRA state dict, the state.json content)."""
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_join_optimizer_state(tensors, state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    lora = load_file(str(path / "lora.safetensors"), device=str(device))
    return int(state["step"]), lora, state


# -- optimizer state <-> safetensors + JSON --------------------------------------------------------
def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state_dict -> (tensors for safetensors, the rest as JSON-able data)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {"param_groups": state["param_groups"], "state": {}}
    for idx, entries in state["state"].items():
        meta["state"][str(idx)] = {key: _split_value(f"{idx}.{key}", value, tensors) for key, value in entries.items()}
    return tensors, meta


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of _split_optimizer_state: an optimizer state_dict again (parameter ids back to ints)."""
    state = {int(idx): {k: _join_value(v, tensors) for k, v in entries.items()}
             for idx, entries in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def _split_value(name: str, value: Any, tensors: dict[str, torch.Tensor]) -> dict:
    """One optimizer-state value -> its JSON entry; tensors go to `tensors` under `name`.

    Nested dicts are kept (bitsandbytes' 8-bit optimizers wrap their quantization state in one).
    """
    if torch.is_tensor(value):
        tensors[name] = value.detach().contiguous().cpu()
        return {"tensor": name, "device_scalar": value.dim() == 0}
    if isinstance(value, dict):
        return {"dict": {str(k): _split_value(f"{name}.{k}", v, tensors) for k, v in value.items()}}
    json.dumps(value)  # anything else must survive JSON as it is (raises TypeError otherwise)
    return {"value": value}


def _join_value(entry: dict, tensors: dict[str, torch.Tensor]) -> Any:
    """One JSON entry of _split_value -> the value again."""
    if "tensor" in entry:
        return tensors[entry["tensor"]]
    if "dict" in entry:
        return {k: _join_value(v, tensors) for k, v in entry["dict"].items()}
    return entry["value"]

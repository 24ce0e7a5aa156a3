"""A content-addressed cache of encoder outputs (VAE latents, text embeddings), as safetensors."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from flen_resources.atomic import write_bytes_atomic


def content_key(*parts: object) -> str:
    """A stable key from strings, numbers, paths (hashed by content) and dicts."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(hashlib.sha256(part.read_bytes()).digest())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


class FeatureCache:
    """`get(kind, key, compute)`: load kind/key.safetensors, or compute, store and return it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def get(self, kind: str, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The tensors stored under kind/key, computed and stored first on a miss (CPU, detached)."""
        path = self.root / kind / f"{key}.safetensors"
        if path.is_file():
            self.hits += 1
            return load_file(str(path))
        self.misses += 1
        tensors = {k: v.detach().contiguous().cpu() for k, v in compute().items()}
        write_bytes_atomic(path, save(tensors))  # a killed run never leaves a truncated entry to hit
        return tensors

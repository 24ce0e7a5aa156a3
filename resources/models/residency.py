"""Which large components of a pipeline sit on the card, within a memory budget.

A component is moved onto the card when a phase needs it and stays there while the budget allows;
only when the components a phase needs, the ones already resident and the working memory of a phase
would not fit, are the others parked on the CPU, largest first. A budget of 0 parks every other
component at each phase: one component on the card at a time, as diffusers' model CPU offload does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)

GIB = 2**30
# The card memory the editor may hold (weights resident + working memory), unless set otherwise
# (ModelsResource.memory_budget_gib, FLEN_MEMORY_BUDGET_GIB): a 24 GB card less the CUDA context and slack.
DEFAULT_MEMORY_BUDGET_GIB = 20
# Working memory kept free for the phase that runs. Measured on Qwen-Image-Edit at 1024x1024 (one
# H200, benchmarks/qwen_edit_gpu.py --batched): the VAE decoding one output takes 4.4 GiB above its
# weights, the transformer's activations over 8,192 image tokens 1.3 GiB; the rest is allocator slack.
WORKSPACE_GIB = 5.0


def _quant_state_bytes(state: object) -> int:
    """Bytes of a bitsandbytes QuantState's tensors (absmax, code, and its nested state)."""
    total = sum(t.numel() * t.element_size() for t in vars(state).values() if torch.is_tensor(t))
    nested = getattr(state, "state2", None)
    return total + (_quant_state_bytes(nested) if nested is not None else 0)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, nf4 weights with their quantization state (absmax:
    1.2 GiB of the 20B transformer's 10.7 GiB, held outside the parameters)."""
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state)
    return total


def _on_card(module: torch.nn.Module) -> bool:
    """Whether `module`'s first parameter sits on a CUDA device."""
    first = next(module.parameters(), None)
    return first is not None and first.device.type == "cuda"


class Residency:
    """Places a pipeline's components on `device` phase by phase, keeping them resident within `budget_gib`."""

    def __init__(self, components: Mapping[str, torch.nn.Module], device: torch.device, budget_gib: float,
                 workspace_gib: float = WORKSPACE_GIB):
        self.components = dict(components)
        self.device = device
        self.budget = budget_gib * GIB
        self.workspace = workspace_gib * GIB
        self.sizes = {name: module_bytes(m) for name, m in self.components.items()}
        # on the card now: what a loader put there already counts (an fp8 transformer is quantized on the card)
        self.resident = {n for n, m in self.components.items() if device.type == "cuda" and _on_card(m)}
        self.moves = 0  # components moved onto the card so far (what batching saves)

    def use(self, *names: str) -> None:
        """Put `names` on the card with the phase's working memory free, parking other components (largest
        first) only as far as the budget needs."""
        if self.device.type != "cuda":  # nothing to place: the CPU holds everything
            return
        wanted = [n for n in names if n not in self.resident]
        needed = sum(self.sizes[n] for n in wanted) + self.workspace
        parkable = sorted((n for n in self.resident if n not in names), key=lambda n: -self.sizes[n])
        for name in parkable:
            if self.resident_bytes() + needed <= self.budget:
                break
            self.park(name)
        if self.resident_bytes() + needed > self.budget:
            log.info("%s need %.1f GiB with their working memory, over the %.1f GiB budget: loaded anyway",
                     ", ".join(names), (self.resident_bytes() + needed) / GIB, self.budget / GIB)
        for name in wanted:
            self.components[name].to(self.device)
            self.resident.add(name)
            self.moves += 1

    def park(self, name: str) -> None:
        """Move `name` to the CPU and give its card memory back."""
        self.components[name].to("cpu")
        self.resident.discard(name)
        torch.cuda.empty_cache()

    def park_all(self) -> None:
        """Every component on the CPU (the card left empty)."""
        for name in list(self.resident):
            self.park(name)

    def resident_bytes(self) -> int:
        """Bytes of the components on the card now."""
        return sum(self.sizes[n] for n in self.resident)

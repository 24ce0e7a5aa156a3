"""Block swapping: a transformer too big for the card trains with some blocks' frozen weights in host memory.

A swapped block's frozen tensors (its fp8 weights, scales, biases and norms; not the LoRA, which trains on the
card) live in pinned host memory and are copied onto the card for each use, on a side stream, one block ahead
of the compute, as musubi-tuner's `blocks_to_swap` and kohya's trainers do:

- forward (and a no-grad forward: previews, the fixed-batch loss): before block i runs its weights must be on
  the card, block i+1's start copying; after it runs, they are parked again;
- backward: a swapped block is always checkpointed, so its forward is recomputed inside its backward. When the
  gradient reaches its outputs (`_Arrive`) its weights start copying, and the previous swapped block's too; when
  the gradient has left its inputs (`_Leave`) they are parked.

While parked, each frozen tensor is an empty tensor: a use out of turn fails loudly instead of computing on
stale or host weights. The hooks run eagerly: a swapped block compiles its `forward`, not its whole call
(`fp8_linear.compile_blocks`), so the compiled graph always sees its weights on the card.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

GIB = 2**30
# Swapped blocks on the card at once: the one computing and the next one on its way in.
IN_FLIGHT_BLOCKS = 2


def swapped_block_count(base_params: float, blocks: int, budget_gib: float, reserve_gib: float) -> int:
    """How many of `blocks` equal blocks of a `base_params` fp8 transformer (1 byte each) must live in host memory
    for the rest, the blocks in flight and `reserve_gib` to fit `budget_gib`; 0 when it all fits."""
    weights_gib = base_params / GIB
    over = weights_gib + reserve_gib - budget_gib
    if over <= 0:
        return 0
    per_block = weights_gib / blocks
    return min(blocks - 1, math.ceil(over / per_block) + IN_FLIGHT_BLOCKS)  # block 0 never swaps: see swap_blocks


def swapped_indices(blocks: int, count: int) -> list[int]:
    """Which blocks swap: `count` of them from the second on (the first one's inputs carry no gradient, so no
    marker would see its backward end; the last ones are those kept un-checkpointed)."""
    return list(range(1, 1 + min(count, blocks - 1)))


class BlockSwap:
    """Keeps `swapped` blocks' frozen tensors in host memory and brings each onto `device` for its turn."""

    def __init__(self, blocks: Sequence[nn.Module], swapped: Sequence[int], device: torch.device):
        self.device = device
        self.order = sorted(swapped)
        self.blocks = {i: blocks[i] for i in self.order}
        cuda = device.type == "cuda"
        self.resident: set[int] = set()
        # the frozen tensors of each swapped block, and their host copies (pinned: asynchronous copies)
        self.frozen: dict[int, list[torch.Tensor]] = {}
        self.host: dict[int, list[torch.Tensor]] = {}
        for i, block in self.blocks.items():
            tensors = [p for p in block.parameters() if not p.requires_grad] + list(block.buffers())
            self.frozen[i] = tensors
            self.host[i] = [t.detach().to("cpu").pin_memory() if cuda else t.detach().to("cpu").clone()
                            for t in tensors]
            self._park(i)
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.pending: dict[int, tuple[list[torch.Tensor], Any]] = {}  # copies on their way, with their event
        self.in_backward: set[int] = set()  # blocks between _Arrive and _Leave: the recompute must not park them
        self.copies = 0  # blocks brought onto the card (for tests and the log)
        self.most_resident = 0  # the most swapped blocks on the card at once
        self.handles = []
        for i, block in self.blocks.items():
            self.handles.append(block.register_forward_pre_hook(self._before(i), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._after(i), with_kwargs=True))

    @property
    def indices(self) -> list[int]:
        """The swapped blocks' indices."""
        return list(self.order)

    def host_gib(self) -> float:
        """The swapped weights held in host memory."""
        return sum(t.numel() * t.element_size() for ts in self.host.values() for t in ts) / GIB

    # -- moving one block -------------------------------------------------------------------------------------
    def _park(self, i: int) -> None:
        for t in self.frozen[i]:
            t.data = torch.empty(0, dtype=t.dtype, device=self.device)
        self.resident.discard(i)

    def _fetch(self, i: int) -> None:
        """Start copying block i onto the card (no-op when it is there or on its way)."""
        if i not in self.blocks or i in self.resident or i in self.pending:
            return
        self.copies += 1
        if self.stream is None:
            self.pending[i] = ([h.clone() for h in self.host[i]], None)
            return
        with torch.cuda.stream(self.stream):
            copies = [h.to(self.device, non_blocking=True) for h in self.host[i]]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending[i] = (copies, event)

    def _ensure(self, i: int) -> None:
        """Block i's weights on the card for the compute stream (waits for its copy)."""
        if i in self.resident:
            return
        self._fetch(i)
        copies, event = self.pending.pop(i)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for c in copies:
                c.record_stream(current)  # allocated on the side stream, used and freed on this one
        for t, c in zip(self.frozen[i], copies, strict=True):
            t.data = c
        self.resident.add(i)
        self.most_resident = max(self.most_resident, len(self.resident))

    def _next(self, i: int, step: int) -> int | None:
        at = self.order.index(i) + step
        return self.order[at] if 0 <= at < len(self.order) else None

    # -- the hooks ----------------------------------------------------------------------------------------------
    def _before(self, i: int):
        @torch.compiler.disable
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            self._ensure(i)
            ahead = self._next(i, 1)
            if ahead is not None and i not in self.in_backward:
                self._fetch(ahead)
            if not torch.is_grad_enabled():
                return args, kwargs
            return _mark(_Leave, self, i, args, kwargs)

        return hook

    def _after(self, i: int):
        @torch.compiler.disable
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if i in self.in_backward:  # the recompute inside backward: the gradient still needs these weights
                return output
            self._park(i)
            if not torch.is_grad_enabled():
                return output
            return _mark_output(self, i, output)

        return hook

    def arrive(self, i: int) -> None:
        """The gradient reached block i's outputs: bring it (and the block before it) in."""
        self.in_backward.add(i)
        self._fetch(i)
        before = self._next(i, -1)
        if before is not None:
            self._fetch(before)

    def leave(self, i: int) -> None:
        """The gradient left block i's inputs: park it."""
        if i in self.in_backward:
            self.in_backward.discard(i)
            self._park(i)

    def remove(self) -> None:
        """Detach the hooks and put every swapped block's weights back on `device` (for saving or merging)."""
        for handle in self.handles:
            handle.remove()
        for i in self.order:
            self.pending.pop(i, None)
            for t, h in zip(self.frozen[i], self.host[i], strict=True):
                t.data = h.to(self.device)
            self.resident.add(i)


class _Leave(torch.autograd.Function):
    """Identity on a block's inputs; its backward runs when the block's backward is done."""

    @staticmethod
    def forward(ctx, swap: BlockSwap, i: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.swap, ctx.i = swap, i
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[Any, ...]:
        ctx.swap.leave(ctx.i)
        return (None, None, *grads)


class _Arrive(torch.autograd.Function):
    """Identity on a block's outputs; its backward runs before the block's backward."""

    @staticmethod
    def forward(ctx, swap: BlockSwap, i: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.swap, ctx.i = swap, i
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[Any, ...]:
        ctx.swap.arrive(ctx.i)
        return (None, None, *grads)


def _grad_tensors(values: Sequence[Any]) -> list[int]:
    return [k for k, v in enumerate(values) if isinstance(v, torch.Tensor) and v.requires_grad]


def _mark(fn: type[torch.autograd.Function], swap: BlockSwap, i: int, args: tuple, kwargs: dict
          ) -> tuple[tuple, dict]:
    """args and kwargs with every tensor that carries a gradient passed through `fn` together (one node, so its
    backward waits for all of their gradients)."""
    keys = list(kwargs)
    values = [*args, *kwargs.values()]
    at = _grad_tensors(values)
    if not at:
        return args, kwargs
    marked = fn.apply(swap, i, *(values[k] for k in at))
    for k, v in zip(at, marked, strict=True):
        values[k] = v
    return tuple(values[:len(args)]), dict(zip(keys, values[len(args):], strict=True))


def _mark_output(swap: BlockSwap, i: int, output: Any) -> Any:
    """The block's output (a tensor or a tuple of them) passed through _Arrive."""
    values = list(output) if isinstance(output, tuple) else [output]
    at = _grad_tensors(values)
    if not at:
        return output
    marked = _Arrive.apply(swap, i, *(values[k] for k in at))
    for k, v in zip(at, marked, strict=True):
        values[k] = v
    return tuple(values) if isinstance(output, tuple) else values[0]

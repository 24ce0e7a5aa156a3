"""Block swapping: a transformer too big for the card trains with some blocks' frozen weights in host memory.

A swapped block's frozen tensors (its fp8 weights, scales, biases and norms; not the LoRA, which trains on the
card) live in one pinned host buffer per block and are copied onto the card for each use, on a side stream,
one block ahead of the compute, as musubi-tuner's `blocks_to_swap` and kohya's trainers do:

- forward (and a no-grad forward: previews, the fixed-batch loss): before block i runs its weights must be on
  the card and block i+1's start copying; after it runs, block i is parked;
- backward: a swapped block is always checkpointed, so its forward is recomputed inside its backward. When the
  gradient reaches its outputs (an `_OnBackward` node on them) its weights start copying, and the previous
  swapped block's too; when the gradient has left its inputs (one on them) it is parked.

The card holds IN_FLIGHT_BLOCKS fixed slots, each the size of the largest swapped block; a copy into a slot
waits (on the GPU, not the CPU) until the compute that used the slot's last block is done, so the card never
holds more than those slots however far the CPU runs ahead. While parked, each frozen tensor is an empty tensor,
so a use of the parameter out of turn fails loudly; a view taken while the block was on the card (what autograd
saves) would read the slot's next block instead, so correctness rests on the order: a block is parked only
after its forward, or after every node of its backward has run (the node on its inputs is its first, run last). The hooks run eagerly: a swapped block
compiles its `forward`, not its whole call (`fp8_linear.compile_blocks`), so the compiled graph always sees its
weights on the card. Not with CUDA graphs or inductor's freezing: both take parameters for fixed addresses.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import partial
from typing import Any

import torch
from torch import nn

from flen_resources.models.quantization import GIB, IN_FLIGHT_BLOCKS

_ALIGN = 256  # bytes: every tensor of a flat buffer starts on a boundary any dtype's view accepts


def swapped_indices(blocks: int, count: int) -> list[int]:
    """Which blocks swap: `count` of them from the second on (the first one's inputs carry no gradient, so no
    marker would see its backward end; the last ones are those kept un-checkpointed)."""
    return list(range(1, 1 + min(count, blocks - 1)))


def _layout(tensors: Sequence[torch.Tensor]) -> tuple[list[tuple[int, torch.dtype, torch.Size]], int]:
    """(byte offset, dtype, shape) of each of `tensors` packed one after another at _ALIGN boundaries, and the
    total size in bytes."""
    specs, size = [], 0
    for t in tensors:
        specs.append((size, t.dtype, t.shape))
        size += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return specs, size


def _views(flat: torch.Tensor, specs: Sequence[tuple[int, torch.dtype, torch.Size]]) -> list[torch.Tensor]:
    """Tensors of `specs`' dtypes and shapes, each a view of the byte buffer `flat` at its offset."""
    return [flat[at:at + shape.numel() * dtype.itemsize].view(dtype).view(shape) for at, dtype, shape in specs]


def pinned_buffer(size: int, device: torch.device | None = None) -> torch.Tensor:
    """A host byte buffer of exactly `size` bytes, page-locked for asynchronous copies to `device` (None: the
    current CUDA device)."""
    # Not torch.empty(pin_memory=True): torch's pinned allocator rounds each buffer up to a power of two, so a
    # Qwen-Image-Edit block's 0.32 GiB took 0.5 (16 GiB of host memory for 32 blocks' 10.1, session 19's H200 log).
    # Registering a plain buffer pins exactly its pages; they are unregistered before the buffer is freed.
    flat = torch.empty(size, dtype=torch.uint8)
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), size, 0))
    weakref.finalize(flat, _unregister, flat.data_ptr(), device or torch.device("cuda", torch.cuda.current_device()))
    return flat


def _unregister(ptr: int, device: torch.device) -> None:
    """Unpin a pinned_buffer's pages once no copy from them can still be running."""
    # torch's pinned allocator would hold a freed buffer back until its copies finished; this one is freed
    # right after, so wait for every stream (a BlockSwap goes when its run ends: once, not per step)
    with suppress(RuntimeError):  # CUDA already torn down at the interpreter's exit: the process frees it all
        torch.cuda.synchronize(device)  # the card the copies go to, whichever thread collects the buffer
        torch.cuda.cudart().cudaHostUnregister(ptr)


class BlockSwap:
    """Keeps `swapped` blocks' frozen tensors in host memory and brings each onto `device` for its turn."""

    def __init__(self, transformer: nn.Module, blocks: Sequence[nn.Module], swapped: Sequence[int],
                 device: torch.device):
        self.device = device
        self.order = sorted(swapped)
        self.blocks = {i: blocks[i] for i in self.order}
        self.cuda = device.type == "cuda"
        self.resident: set[int] = set()
        self.slot_of: dict[int, int] = {}  # block -> the card slot it is in or on its way to
        self.frozen: dict[int, list[torch.Tensor]] = {}  # each swapped block's frozen tensors (their .data moves)
        self.specs: dict[int, list[tuple[int, torch.dtype, torch.Size]]] = {}
        # one flat byte buffer per block, pinned on a CUDA machine
        self.host: dict[int, torch.Tensor] = {}
        for i, block in self.blocks.items():
            tensors = [p for p in block.parameters() if not p.requires_grad] + list(block.buffers())
            self.specs[i], size = _layout(tensors)
            flat = pinned_buffer(size, device) if self.cuda else torch.empty(size, dtype=torch.uint8)
            for view, t in zip(_views(flat, self.specs[i]), tensors, strict=True):
                view.copy_(t.detach())
            self.frozen[i], self.host[i] = tensors, flat
            self._park(i)
        slot_size = max((flat.numel() for flat in self.host.values()), default=0)
        # on the CPU too (copied at once there): the tests see the slots' schedule
        self.slots = [torch.empty(slot_size, dtype=torch.uint8, device=device) for _ in range(IN_FLIGHT_BLOCKS)]
        self.slot_free = [None] * len(self.slots)  # per slot: the compute event after which it may be overwritten
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pending: dict[int, Any] = {}  # block -> its copy's event (None on the CPU)
        self.in_backward: set[int] = set()  # blocks between arrive and leave: the recompute must not park them
        self.copies = 0  # blocks brought onto the card (what the tests count)
        self.handles = [transformer.register_forward_pre_hook(self._start)]
        for i, block in self.blocks.items():
            self.handles.append(block.register_forward_pre_hook(self._before(i), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._after(i), with_kwargs=True))

    @property
    def indices(self) -> list[int]:
        """The swapped blocks' indices."""
        return list(self.order)

    def host_gib(self) -> float:
        """The host memory the swapped weights take."""
        return sum(flat.numel() for flat in self.host.values()) / GIB

    def on_card(self) -> set[int]:
        """The swapped blocks on the card or on their way there."""
        return self.resident | set(self.pending)

    # -- moving one block -------------------------------------------------------------------------------------
    def _park(self, i: int) -> None:
        for t in self.frozen[i]:
            t.data = torch.empty(0, dtype=t.dtype, device=self.device)
        self.resident.discard(i)
        slot = self.slot_of.pop(i, None)
        if slot is not None and self.cuda:  # the next copy into this slot waits for the compute queued so far
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.slot_free[slot] = event

    def _fetch(self, i: int) -> bool:
        """Start copying block i onto the card; False when no slot is free (it is then fetched at its turn)."""
        if i not in self.blocks or i in self.resident or i in self.pending:
            return True
        taken = set(self.slot_of.values())
        slot = next((s for s in range(len(self.slots)) if s not in taken), None)
        if slot is None:
            return False
        self.slot_of[i] = slot
        self.copies += 1
        if not self.cuda:
            self.slots[slot][:self.host[i].numel()].copy_(self.host[i])
            self.pending[i] = None
            return True
        with torch.cuda.stream(self.stream):
            if self.slot_free[slot] is not None:
                self.stream.wait_event(self.slot_free[slot])
            size = self.host[i].numel()
            self.slots[slot][:size].copy_(self.host[i], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending[i] = event
        return True

    def _ensure(self, i: int) -> None:
        """Block i's weights on the card for the compute stream (the stream waits for its copy)."""
        if i in self.resident:
            return
        if not self._fetch(i):
            raise RuntimeError(f"block swap: no free slot for block {i} (on the card: {sorted(self.on_card())})")
        event = self.pending.pop(i)
        if event is not None:  # None: the CPU, copied at once
            torch.cuda.current_stream(self.device).wait_event(event)
        for t, view in zip(self.frozen[i], _views(self.slots[self.slot_of[i]], self.specs[i]), strict=True):
            t.data = view
        self.resident.add(i)

    def _next(self, i: int, step: int) -> int | None:
        at = self.order.index(i) + step
        return self.order[at] if 0 <= at < len(self.order) else None

    # -- the hooks ----------------------------------------------------------------------------------------------
    def _start(self, module: nn.Module, args: tuple) -> None:
        """A new forward of the transformer: park what an earlier step left (a block whose inputs carried no
        gradient never sees leave; a backward may have been abandoned), and start the first swapped copy."""
        for i in sorted(self.on_card() | self.in_backward):
            self.pending.pop(i, None)
            self._park(i)
        self.in_backward.clear()
        if self.order:
            self._fetch(self.order[0])

    def _before(self, i: int):
        @torch.compiler.disable
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            self._ensure(i)
            ahead = self._next(i, 1)
            if ahead is not None and i not in self.in_backward:
                self._fetch(ahead)
            if not torch.is_grad_enabled():
                return args, kwargs
            return _mark(partial(self.leave, i), args, kwargs)

        return hook

    def _after(self, i: int):
        @torch.compiler.disable
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if i in self.in_backward:  # the recompute inside backward: the gradient still needs these weights
                return output
            self._park(i)
            if not torch.is_grad_enabled():
                return output
            return _mark(partial(self.arrive, i), output)

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


class _OnBackward(torch.autograd.Function):
    """Identity on tensors; `then()` runs in backward once the gradients of all of them have arrived: on a
    block's inputs, when its backward is done (BlockSwap.leave); on its outputs, before it starts (arrive)."""

    @staticmethod
    def forward(ctx, then: Callable[[], None], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.then = then
        ctx.set_materialize_grads(False)  # an output nothing used gets None, not zeros to backpropagate
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        ctx.then()
        return (None, *grads)


def _mark(then: Callable[[], None], args: Any, kwargs: dict | None = None) -> Any:
    """A block's inputs (args, kwargs) or output (a tensor or a tuple) with every tensor that carries a gradient
    passed through one _OnBackward node together, so `then` waits for all of their gradients."""
    if type(args) is not tuple and not isinstance(args, torch.Tensor):  # a list or a namedtuple: not rebuilt as such
        raise TypeError(f"block swap marks a tensor or a plain tuple of them, not {type(args).__name__}")
    single = kwargs is None and not isinstance(args, tuple)
    positional = [args] if single else list(args)
    keys = list(kwargs or {})
    values = [*positional, *(kwargs or {}).values()]
    at = [k for k, v in enumerate(values) if isinstance(v, torch.Tensor) and v.requires_grad]
    if at:
        for k, v in zip(at, _OnBackward.apply(then, *(values[k] for k in at)), strict=True):
            values[k] = v
    if kwargs is None:
        return values[0] if single else tuple(values)
    return tuple(values[:len(positional)]), dict(zip(keys, values[len(positional):], strict=True))

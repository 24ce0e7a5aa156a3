"""Block swapping (models/block_swap.py): the schedule on the CPU with blocks shaped as diffusers' (kwargs in, a
tuple out, checkpointed as the trainer checkpoints them), the count rule, and on a GPU the memory it saves."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from flen_resources.models.block_swap import BlockSwap, swapped_indices
from flen_resources.models.quantization import IN_FLIGHT_BLOCKS

CPU = torch.device("cpu")


class _Block(nn.Module):
    """Two streams in, two out, as a Qwen-Image block: frozen weights, a norm buffer, a trainable LoRA-like delta."""

    def __init__(self, width: int):
        super().__init__()
        self.img = nn.Linear(width, width)
        self.txt = nn.Linear(width, width)
        self.register_buffer("scale", torch.full((width,), 0.5))
        self.requires_grad_(False)
        self.delta = nn.Parameter(torch.zeros(width, width))  # trains, stays on the card

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor):
        txt = torch.tanh(self.txt(encoder_hidden_states) * self.scale + temb)
        img = torch.tanh(self.img(hidden_states) + hidden_states @ self.delta + txt.mean(1, keepdim=True))
        return txt, img


class _Transformer(nn.Module):
    """Calls its blocks as diffusers does: checkpointed positionally while training, by keyword otherwise."""

    def __init__(self, width: int = 32, blocks: int = 5):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(_Block(width) for _ in range(blocks))

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        temb = torch.ones(txt.shape[-1], device=txt.device)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled():
                txt, img = torch.utils.checkpoint.checkpoint(block.__call__, img, txt, temb, use_reentrant=False)
            else:
                txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb=temb)
        return img.square().mean() + txt.square().mean()


def _models(swapped: list[int], device: torch.device = CPU) -> tuple[_Transformer, _Transformer, BlockSwap]:
    torch.manual_seed(0)
    plain = _Transformer().to(device)
    for block in plain.transformer_blocks:
        nn.init.normal_(block.delta, std=0.1)
    ours = copy.deepcopy(plain)
    for i in swapped:  # placed as transformer_to_fp8 places them: the frozen weights on the host, the LoRA not
        ours.transformer_blocks[i].to("cpu").delta.data = ours.transformer_blocks[i].delta.data.to(device)
    return plain, ours, BlockSwap(ours, list(ours.transformer_blocks), swapped, device)


def _watch(swap: BlockSwap) -> list[tuple[int, bool, set[int]]]:
    """(block, in its backward, the swapped blocks on the card or on their way) as each swapped block starts."""
    seen = []
    for i, block in swap.blocks.items():
        block.register_forward_pre_hook(lambda module, args, i=i: seen.append((i, i in swap.in_backward,
                                                                                swap.on_card())))
    return seen


def _inputs(device: torch.device = CPU) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 6, 32, generator=g).to(device), torch.randn(2, 3, 32, generator=g).to(device)


def _step(model: _Transformer, device: torch.device = CPU) -> tuple[float, list[torch.Tensor]]:
    loss = model(*_inputs(device))
    loss.backward()
    return loss.item(), [block.delta.grad.clone() for block in model.transformer_blocks if block.delta.requires_grad]


def _parked(swap: BlockSwap) -> bool:
    return all(t.numel() == 0 for i in swap.indices for t in swap.frozen[i])


@pytest.mark.parametrize("early_stop", [True, False])
def test_a_training_step_with_swapped_blocks_gives_the_gradients_of_one_without(early_stop: bool):
    """With checkpoint's early stop (torch's default) the recompute ends at the last saved tensor; without it the
    whole forward runs again, its post-hook included, which must not park the block its backward still needs."""
    plain, ours, swap = _models([1, 2, 3])
    seen = _watch(swap)
    assert _parked(swap), "a swapped block waits in host memory"
    loss, grads = _step(plain)
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        loss_swapped, grads_swapped = _step(ours)
    assert loss_swapped == loss
    for a, b in zip(grads, grads_swapped, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert _parked(swap) and not swap.on_card(), "every block parked again after backward"
    assert swap.copies == 2 * 3, "each swapped block comes in once forward and once for its backward"
    # forward: the block computing and the next one on its way; backward (its recompute): the block and the one
    # before it
    assert seen == [(1, False, {1, 2}), (2, False, {2, 3}), (3, False, {3}),
                    (3, True, {3, 2}), (2, True, {2, 1}), (1, True, {1})]
    assert all(len(on_card) <= IN_FLIGHT_BLOCKS for _, _, on_card in seen)


def test_forwards_without_backward_park_every_block_and_a_step_after_them_still_matches():
    """The previews (no grad, blocks called by keyword) and the fixed-batch loss (grad on, no backward)."""
    plain, ours, swap = _models([1, 3])
    seen = _watch(swap)
    with torch.no_grad():
        assert ours(*_inputs()).item() == plain(*_inputs()).item()
    assert _parked(swap) and seen == [(1, False, {1, 3}), (3, False, {3})]
    ours(*_inputs())  # the fixed-batch loss: a graph that is never backpropagated
    assert _parked(swap) and not swap.in_backward
    assert _step(ours)[0] == _step(plain)[0]
    assert _parked(swap) and not swap.on_card()


def test_a_block_whose_inputs_carry_no_gradient_is_parked_by_the_next_forward():
    """Block 0 without a trainable weight: block 1's inputs need no gradient, so its _Leave never runs."""
    plain, ours, swap = _models([1, 2])
    for model in (plain, ours):
        model.transformer_blocks[0].delta.requires_grad_(False)
    _step(ours)
    assert swap.in_backward == {1}, "stranded after backward"
    with torch.no_grad():
        ours(*_inputs())
    assert _parked(swap) and not swap.in_backward and not swap.on_card()
    for model in (plain, ours):
        for block in model.transformer_blocks:
            block.delta.grad = None
    for a, b in zip(_step(ours)[1], _step(plain)[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_parked_weight_fails_loudly_instead_of_computing():
    _, ours, swap = _models([2])
    img, txt = _inputs()
    with pytest.raises(RuntimeError):  # forward() itself, past the hooks that would bring the weights in
        ours.transformer_blocks[2].forward(img, txt, torch.ones(32))


def test_compiled_swapped_blocks_run_their_hooks_eagerly_and_share_one_graph(monkeypatch):
    """fp8_linear.compile_blocks: a swapped block compiles its forward (here with the aot_eager backend, no C
    compiler needed); the .data swaps between calls cause no recompilation per block."""
    from torch._dynamo.utils import counters

    import flen_resources.models.fp8_linear as fp8_linear

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    plain, ours, swap = _models([1, 2, 3])
    fp8_linear.compile_blocks(ours, eager_hooks=[ours.transformer_blocks[i] for i in swap.indices])
    loss, grads = _step(plain)
    loss_swapped, grads_swapped = _step(ours)
    assert loss_swapped == pytest.approx(loss, rel=1e-6)
    for a, b in zip(grads, grads_swapped, strict=True):
        torch.testing.assert_close(a, b)
    assert _parked(swap) and swap.copies == 6
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # forward, and _call_impl: not per block
    torch._dynamo.reset()


def test_which_blocks_swap():
    assert swapped_indices(60, 15) == list(range(1, 16))
    assert swapped_indices(2, 15) == [1], "the tiny pack's two blocks"


def test_the_trainer_config_swaps_only_an_fp8_base_that_does_not_fit_the_card(monkeypatch):
    """resolved() as on an H200 (a CUDA device with fp8 matmuls), checked on the CPU."""
    import flen_resources.models.fp8_linear as fp8_linear
    import flen_resources.models.pipelines as pipelines
    import flen_resources.models.quantization as quantization
    from flen_resources.trainers.config import LoraTrainConfig, TrainingError

    qwen = "qwen-image-edit-2509"
    assert LoraTrainConfig(device="cpu", quantization="none").resolved(qwen).swapped_blocks == 0
    if fp8_linear.fp8_matmuls(CPU):
        assert LoraTrainConfig(device="cpu", quantization="fp8").resolved(qwen).swapped_blocks == 0, "no card"
    monkeypatch.setattr(pipelines, "pick_device", lambda _: torch.device("cuda"))
    monkeypatch.setattr(fp8_linear, "fp8_matmuls", lambda _: True)
    monkeypatch.setattr(fp8_linear, "_compiler_works", {"cuda": True})
    monkeypatch.setattr(quantization, "host_memory_gib", lambda: 128.0)  # the H200 machine's host
    auto = LoraTrainConfig().resolved(qwen)
    assert (auto.quantization, auto.swapped_blocks, auto.kept_activations, auto.optimizer) == ("fp8", 32, 0, "adamw"), \
        "Qwen's 20B: fp8 with blocks swapped, to an nf4 base's card memory"
    assert LoraTrainConfig(quantization="fp8").resolved(qwen).swapped_blocks == 32
    assert LoraTrainConfig(quantization="fp8").resolved(qwen, memory_budget_gib=40).swapped_blocks == 0
    assert LoraTrainConfig(quantization="fp8").resolved(qwen, memory_budget_gib=8).swapped_blocks == 58
    assert LoraTrainConfig().resolved(qwen, memory_budget_gib=7).quantization == "nf4", "fp8 cannot fit 7 GiB"
    assert LoraTrainConfig(swapped_blocks=0).resolved(qwen).quantization == "nf4", "told not to swap: nf4"
    assert LoraTrainConfig(gradient_checkpointing=False).resolved(qwen).quantization == "nf4", "cannot swap: nf4"
    assert LoraTrainConfig().resolved(memory_budget_gib=14).quantization == "nf4", "FLUX: auto never swaps it"
    assert LoraTrainConfig(quantization="fp8").resolved(memory_budget_gib=14).swapped_blocks > 0, "asked for: it does"
    assert LoraTrainConfig(quantization="fp8", swapped_blocks=20).resolved(qwen).swapped_blocks == 20, "what fits"
    with pytest.raises(TrainingError, match="swapped_blocks 5: qwen-image-edit-2509 in fp8 fits the 20 GiB memory "
                                            "budget only with 20 or more .* set swapped_blocks to auto or at least 20"):
        LoraTrainConfig(quantization="fp8", swapped_blocks=5).resolved(qwen)
    with pytest.raises(TrainingError, match="swapped_blocks 0: .* only with 20 or more"):
        LoraTrainConfig(quantization="fp8", swapped_blocks=0).resolved(qwen)
    assert LoraTrainConfig(quantization="fp8", swapped_blocks=5).resolved(qwen, memory_budget_gib=40).swapped_blocks == 5
    monkeypatch.setattr(quantization, "host_memory_gib", lambda: 31.0)  # a desktop with 32 GB of RAM
    assert LoraTrainConfig().resolved(qwen).quantization == "nf4", "38 GiB of bf16 would not fit the host"
    assert LoraTrainConfig().resolved().quantization == "fp8", "FLUX's 22 GiB do"
    with pytest.raises(TrainingError, match="does not fit a 4 GiB budget even with all but its first block swapped"):
        LoraTrainConfig(quantization="fp8").resolved(qwen, memory_budget_gib=4)
    assert LoraTrainConfig().resolved().swapped_blocks == 0, "FLUX.1-dev fits in fp8"
    assert LoraTrainConfig(quantization="fp8", swapped_blocks=4).resolved().swapped_blocks == 4
    with pytest.raises(TrainingError, match="swapped_blocks 4 with quantization 'nf4': only an fp8 base"):
        LoraTrainConfig(quantization="nf4", swapped_blocks=4).resolved()
    with pytest.raises(TrainingError, match="swapped_blocks 60: qwen-image-edit-2509 has 60 blocks .* at most 59"):
        LoraTrainConfig(quantization="fp8", swapped_blocks=60).resolved(qwen)
    with pytest.raises(TrainingError, match="swapped_blocks needs gradient_checkpointing"):
        LoraTrainConfig(quantization="fp8", gradient_checkpointing=False).resolved(qwen)
    with pytest.raises(TrainingError, match="swapped_blocks must be 'auto' or 0 or more"):
        LoraTrainConfig(swapped_blocks=-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_swapped_blocks_leave_the_card_and_the_step_still_matches():
    cuda = torch.device("cuda")
    plain, ours, swap = _models([1, 2, 3], cuda)

    def on_card(model: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t.is_cuda)

    frozen = sum(t.numel() * t.element_size() for i in swap.indices
                 for t in [*plain.transformer_blocks[i].parameters(), *plain.transformer_blocks[i].buffers()]
                 if not t.requires_grad)
    assert on_card(plain) - on_card(ours) == frozen
    assert len(swap.slots) == IN_FLIGHT_BLOCKS and all(swap.host[i].is_pinned() for i in swap.indices)
    seen = _watch(swap)
    # Slow copies and slow compute (about 10 ms each) so that a missing wait, either way, would read a slot before
    # its copy landed or overwrite it under a block still computing: the gradients would differ.
    fetch, ensure = swap._fetch, swap._ensure

    def slow_fetch(i: int) -> bool:
        with torch.cuda.stream(swap.stream):
            torch.cuda._sleep(20_000_000)
        return fetch(i)

    def slow_ensure(i: int) -> None:
        ensure(i)
        torch.cuda._sleep(20_000_000)

    swap._fetch, swap._ensure = slow_fetch, slow_ensure
    allocated = []
    for _ in range(2):  # the second step reuses the slots the first one freed
        for model in (plain, ours):
            for block in model.transformer_blocks:
                block.delta.grad = None
        loss, grads = _step(plain, cuda)
        loss_swapped, grads_swapped = _step(ours, cuda)
        assert loss_swapped == pytest.approx(loss, rel=1e-6)
        for a, b in zip(grads, grads_swapped, strict=True):  # stale or half-copied weights would be far off
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    assert allocated[0] == allocated[1], "a step allocates nothing that stays: the copies land in the slots"
    assert _parked(swap) and not swap.on_card() and swap.copies == 2 * 2 * 3
    assert all(len(on_card) <= IN_FLIGHT_BLOCKS for _, _, on_card in seen)
    assert on_card(plain) - on_card(ours) == frozen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_pinned_buffer_is_its_exact_size_and_copies_to_the_card():
    from flen_resources.models.block_swap import pinned_buffer

    size = 3 * 2**20 + 17  # not a power of two: torch's pinned allocator would take 4 MiB
    flat = pinned_buffer(size)
    assert flat.is_pinned() and flat.numel() == size
    flat.copy_(torch.arange(size) % 251)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        on_card = flat.to("cuda", non_blocking=True)
    stream.synchronize()
    assert torch.equal(on_card.cpu(), flat)
    view = flat[:10]
    del flat
    assert view.is_pinned(), "a view holds its buffer, and its pages pinned"
    pages = view.untyped_storage()  # the memory, without the tensor: its pages must be unpinned with the tensor
    del view
    cudart = torch.cuda.cudart()
    assert int(cudart.cudaHostRegister(pages.data_ptr(), size, 0)) == 0, "still registered: never unpinned"
    assert int(cudart.cudaHostUnregister(pages.data_ptr())) == 0

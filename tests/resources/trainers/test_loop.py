"""The training loop (trainers/loop.py): optimizer choice, activation budget, allocator, fixed-batch loss; no GPU."""

from __future__ import annotations

import torch

from flen_resources.trainers.config import LoraTrainConfig
from flen_resources.trainers.loop import (
    compiled_activation_budget,
    fixed_batch_loss,
    grow_segments_in_place,
    make_optimizer,
    run_training_loop,
)

CPU = torch.device("cpu")


def test_torch_adamw_on_the_cpu_is_not_fused_and_takes_the_config():
    params = [torch.nn.Parameter(torch.zeros(4))]
    optimizer = make_optimizer(params, LoraTrainConfig(optimizer="adamw"), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults["fused"]
    assert optimizer.defaults["lr"] == LoraTrainConfig.learning_rate


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.lin(x)).sin()


def test_every_step_runs_within_the_configured_activation_budget(tmp_path):
    """The loop holds config.activation_budget while the loss runs (where blocks compile), then puts it back."""
    import torch._functorch.config as functorch_config
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["lin"]), _Tiny())
    before, seen = functorch_config.activation_memory_budget, []

    def loss(batch, generator):
        seen.append(functorch_config.activation_memory_budget)
        return model(torch.ones(1, 4)).pow(2).mean()

    config = LoraTrainConfig(max_steps=2, activation_budget=0.5, device="cpu", lr_warmup_steps=0,
                             checkpoint_every=2, sample_every=0)
    run_training_loop(model, [{"bucket": (64, 64)}], config, tmp_path, "tiny", CPU, loss, log=lambda _: None)
    assert len(seen) >= 2 and set(seen) == {0.5}
    assert functorch_config.activation_memory_budget == before


def test_a_run_under_another_budget_compiles_its_blocks_afresh():
    """dynamo would hand the last run's partition to a new instance of the same block class."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    torch.compiler.reset()
    x = torch.ones(2, 4, requires_grad=True)
    for budget in (0.2, 0.2, 1.0):  # a new block each run, as every run loads its own transformer
        block = _Tiny()
        block.compile(backend=counter)
        with compiled_activation_budget(budget):
            block(x).sum().backward()
    assert counter.frame_count == 2, "the same budget reuses the compiled graph, another one compiles again"


def test_the_allocator_is_left_alone_on_a_cpu_and_when_the_user_chose(monkeypatch):
    assert grow_segments_in_place(CPU) is False
    for variable in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        with monkeypatch.context() as env:
            env.setenv(variable, "max_split_size_mb:128")
            assert grow_segments_in_place(torch.device("cuda")) is False, f"the user's {variable} wins"


def test_the_fixed_batch_loss_runs_in_the_training_steps_mode_and_leaves_no_gradient():
    """Gradients on and train(), as a step runs (a no_grad or eval() forward would compile the blocks again)."""
    model = torch.nn.Linear(4, 1)
    seen = []

    def loss(batch, generator):
        seen.append((torch.is_grad_enabled(), model.training))
        return model(batch[0]["x"] + torch.randn(4, generator=generator)).square().mean()

    examples = [{"x": torch.full((4,), float(i))} for i in range(10)]
    first = fixed_batch_loss(model, examples, LoraTrainConfig(), loss)
    assert seen == [(True, True)] * 8 and model.weight.grad is None  # the first 8 examples, forward only
    assert fixed_batch_loss(model, examples, LoraTrainConfig(), loss) == first  # fixed noise: the same figure

"""The training loop's optimizer choice (trainers/loop.py), checked without a GPU."""

from __future__ import annotations

import torch

from flen_resources.trainers.config import LoraTrainConfig
from flen_resources.trainers.loop import make_optimizer


def test_torch_adamw_on_the_cpu_is_not_fused_and_takes_the_config():
    params = [torch.nn.Parameter(torch.zeros(4))]
    optimizer = make_optimizer(params, LoraTrainConfig(optimizer="adamw"), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults["fused"]
    assert optimizer.defaults["lr"] == LoraTrainConfig.learning_rate

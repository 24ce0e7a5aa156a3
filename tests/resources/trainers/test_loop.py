"""The training loop's GPU settings (trainers/loop.py), checked without a GPU: they are process flags."""

from __future__ import annotations

import pytest
import torch

from flen_resources.trainers.config import LoraTrainConfig
from flen_resources.trainers.loop import lora_matmuls_in_tf32, make_optimizer


def test_lora_matmuls_run_in_tf32_on_a_gpu_and_the_setting_comes_back():
    before = torch.get_float32_matmul_precision()
    with lora_matmuls_in_tf32(torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before  # the CPU keeps full fp32
    with pytest.raises(RuntimeError, match="boom"), lora_matmuls_in_tf32(torch.device("cuda")):
        assert torch.get_float32_matmul_precision() == "high"
        raise RuntimeError("boom")
    assert torch.get_float32_matmul_precision() == before


def test_torch_adamw_on_the_cpu_is_not_fused_and_takes_the_config():
    params = [torch.nn.Parameter(torch.zeros(4))]
    optimizer = make_optimizer(params, LoraTrainConfig(optimizer="adamw"), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults["fused"]
    assert optimizer.defaults["lr"] == LoraTrainConfig.learning_rate

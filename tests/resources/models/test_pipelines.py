"""One nf4 setting and one device rule, shared by inference and training."""

from __future__ import annotations

import torch

from flen_resources.models.pipelines import QUANTIZABLE, nf4_config, nf4_kwargs, pick_device


def test_the_pipelines_quantize_with_the_one_nf4_setting():
    for pipeline, components in QUANTIZABLE.items():
        config = nf4_config(pipeline)
        assert config.quant_kwargs == nf4_kwargs() and config.components_to_quantize == components
    assert nf4_kwargs()["bnb_4bit_quant_type"] == "nf4" and nf4_kwargs()["bnb_4bit_compute_dtype"] == torch.bfloat16


def test_the_trainers_use_the_same_rules():
    from flen_resources.trainers import base

    assert base.pick_device is pick_device
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected and pick_device("cpu").type == "cpu"

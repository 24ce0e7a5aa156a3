"""GPU-only: nf4 loading of the tiny pack (bitsandbytes needs CUDA). CI skips these; run them on a GPU."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from flen_resources.editors import EditRequest
from flen_resources.editors.qwen_edit import QwenEditEditor

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_nf4_edit_keeps_one_component_on_the_gpu():
    editor = QwenEditEditor(model="tiny", quantization="nf4", device="cuda", output_area=128 * 128)
    image = Image.new("RGB", (256, 256), (120, 90, 60))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()  # what earlier tests in this process left (compiled graphs, caches)
    result = editor.edit([image], EditRequest("t", "qwen_edit", {"loras": {"lightning-8step": 1.0}}, prompt="x", seed=1))
    assert result.params["quantization"] == "nf4" and result.image.size == (128, 128)
    assert torch.cuda.memory_allocated() - before < 64 * 2**20, "model CPU offload parks every component after the edit"

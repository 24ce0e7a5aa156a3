"""GPU-only: nf4 loading of the tiny pack (bitsandbytes needs CUDA). CI skips these; run them on a GPU."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from flen_resources.editors import EditJob, EditRequest
from flen_resources.editors.qwen_edit import QwenEditEditor

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _request(seed: int = 1) -> EditRequest:
    return EditRequest("t", "qwen_edit", {"loras": {"lightning-8step": 1.0}}, prompt="x", seed=seed)


def test_nf4_edit_with_no_budget_keeps_one_component_on_the_gpu():
    editor = QwenEditEditor(model="tiny", quantization="nf4", device="cuda", output_area=128 * 128,
                            memory_budget_gib=0)
    image = Image.new("RGB", (256, 256), (120, 90, 60))
    result = editor.edit([image], _request())
    assert result.params["quantization"] == "nf4" and result.image.size == (128, 128)
    assert editor.residency.resident == {"vae"}, "a budget of 0 parks every other component after its phase"
    editor.residency.park_all()


def test_nf4_batch_keeps_the_components_resident_within_the_budget():
    editor = QwenEditEditor(model="tiny", quantization="nf4", device="cuda", output_area=128 * 128)
    image = Image.new("RGB", (256, 256), (120, 90, 60))
    first = editor.edit_batch([EditJob([image], _request(seed)) for seed in (1, 2, 3)])
    assert editor.residency.resident == {"text_encoder", "transformer", "vae"}, "the tiny pack fits 20 GiB"
    moves = editor.residency.moves
    again = editor.edit_batch([EditJob([image], _request(seed)) for seed in (1, 2, 3)])
    assert editor.residency.moves == moves, "a resident component is not moved again"
    for a, b in zip(first, again, strict=True):
        assert (torch.tensor(list(a.image.getdata())) - torch.tensor(list(b.image.getdata()))).abs().max() <= 2
    editor.residency.park_all()

"""The residency rule: components stay on the card while the budget allows, the largest parked first."""

from __future__ import annotations

import torch

from flen_resources.models.residency import GIB, Residency


class Fake(torch.nn.Module):
    """A component that records where it was moved, without moving anything."""

    def __init__(self):
        super().__init__()
        self.where = "cpu"

    def to(self, device):  # noqa: D102 (a stand-in for nn.Module.to)
        self.where = str(device)
        return self


def _residency(budget_gib: float) -> Residency:
    place = Residency({"text_encoder": Fake(), "transformer": Fake(), "vae": Fake()}, torch.device("cuda", 0),
                      budget_gib, workspace_gib=5)
    place.sizes = {"text_encoder": 6 * GIB, "transformer": 11 * GIB, "vae": 0.25 * GIB}  # Qwen-Image-Edit in nf4
    return place


def _phases(place: Residency) -> list[set[str]]:
    seen = []
    for names in (("text_encoder",), ("transformer", "vae"), ("vae",), ("text_encoder",), ("transformer", "vae")):
        place.use(*names)
        assert all(place.components[n].where == "cuda:0" for n in names)
        assert place.resident_bytes() + place.workspace <= place.budget or len(place.resident) == len(names)
        seen.append(set(place.resident))
    return seen


def test_a_large_budget_moves_each_component_once():
    place = _residency(40)
    assert _phases(place)[-1] == {"text_encoder", "transformer", "vae"}
    assert place.moves == 3


def test_twenty_gib_parks_the_text_encoder_for_the_transformer_and_back():
    place = _residency(20)
    assert _phases(place) == [{"text_encoder"}, {"transformer", "vae"}, {"transformer", "vae"},
                              {"text_encoder", "vae"}, {"transformer", "vae"}]
    assert place.components["text_encoder"].where == "cpu"


def test_no_budget_keeps_one_component_at_a_time():
    place = _residency(0)
    assert _phases(place) == [{"text_encoder"}, {"transformer", "vae"}, {"vae"}, {"text_encoder"},
                              {"transformer", "vae"}]

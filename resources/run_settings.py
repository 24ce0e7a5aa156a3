"""Named run settings: how much work one iteration does, sized for the machine it runs on.

Three sets: `cpu-demo` (the embedded tiny pack on a CPU, a whole iteration in minutes), `24gb-card`
(one consumer card) and `large-card` (an 80 GB-class card: the production iteration). `auto` picks one
from the device and the models (pick_run_settings). Only the knobs that size the work are named here;
an asset's config leaves them unset (None) to take them from the run settings, or sets them to overrule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

AUTO = "auto"
RUN_SETTINGS_ENV = "FLEN_RUN_SETTINGS"  # the variable that names them (else auto)


class RunSettingsError(ValueError):
    """Run settings that cannot run here, or no such settings; the message names the setting and the fix."""


@dataclass(frozen=True)
class RunSettings:
    """One named set of sized knobs, per asset."""

    name: str
    title: str  # what it is for, one line (the launchpad's job description)
    min_gpu_gib: float | None  # None: runs anywhere; else a CUDA GPU with at least this much memory
    knobs: Mapping[str, Mapping[str, Any]]  # asset -> config field -> value

    def run_config(self) -> dict[str, Any]:
        """Dagster run config that spells the knobs out (a job's launchpad defaults)."""
        ops = {asset: {"config": dict(values)} for asset, values in self.knobs.items()}
        return {"ops": ops, "resources": {"run_settings": {"config": {"name": self.name}}}}


# The knobs that size the work: every set gives each of them a value.
SIZED_KNOBS: dict[str, tuple[str, ...]] = {
    "enriched_images": ("recipe",),
    "flux_lora": ("steps", "resolution", "rank", "learning_rate", "checkpoint_every"),
    "lora_eval": ("size", "steps", "seeds"),
    "synthetic_batch": ("size", "steps", "seeds"),
    "qwen_adapter": ("steps", "resolution", "rank", "learning_rate", "checkpoint_every"),
}

CPU_DEMO = RunSettings(
    name="cpu-demo",
    title="The embedded tiny pack on a CPU: a whole iteration in minutes, 64 px images, a few steps.",
    min_gpu_gib=None,
    knobs={
        "enriched_images": {"recipe": "demo"},
        "flux_lora": {"steps": 20, "resolution": 64, "rank": 8, "learning_rate": 1e-3, "checkpoint_every": 10},
        "lora_eval": {"size": 64, "steps": 2, "seeds": [1, 2]},
        "synthetic_batch": {"size": 64, "steps": 2, "seeds": [11]},
        "qwen_adapter": {"steps": 4, "resolution": 64, "rank": 4, "learning_rate": 1e-4, "checkpoint_every": 0},
    },
)

# FLUX.1-dev and Qwen-Image-Edit at 1024 px in nf4 peak at 8.7 and 19.3 GiB on the card (README's figures; in
# fp8, as on an Ada card, 17.7 and, with blocks swapped, 15.8, measured on an H200), so a 24 GB card trains both;
# it generates fewer evaluation and synthetic images than a large card.
CARD_24GB = RunSettings(
    name="24gb-card",
    title="One 24 GB card (RTX 3090/4090): nf4 base weights (fp8 on a 4090 with the RAM for it), 1024 px, "
          "1,500 FLUX steps, 6 evaluation and 8 synthetic images.",
    min_gpu_gib=20.0,
    knobs={
        "enriched_images": {"recipe": "angles"},
        "flux_lora": {"steps": 1500, "resolution": 1024, "rank": 16, "learning_rate": 1e-4, "checkpoint_every": 0},
        "lora_eval": {"size": 1024, "steps": 28, "seeds": [1, 2]},
        "synthetic_batch": {"size": 1024, "steps": 28, "seeds": [11, 12]},
        "qwen_adapter": {"steps": 500, "resolution": 1024, "rank": 16, "learning_rate": 1e-4, "checkpoint_every": 0},
    },
)

# The same training as a 24 GB card; the room goes to twice the evaluation and synthetic images.
CARD_LARGE = RunSettings(
    name="large-card",
    title="An 80 GB-class card (A100, H100, H200): the production iteration, 1,500 FLUX steps at 1024 px, "
          "12 evaluation and 16 synthetic images.",
    min_gpu_gib=40.0,
    knobs={
        **CARD_24GB.knobs,
        "lora_eval": {"size": 1024, "steps": 28, "seeds": [1, 2, 3, 4]},
        "synthetic_batch": {"size": 1024, "steps": 28, "seeds": [11, 12, 13, 14]},
    },
)

RUN_SETTINGS: dict[str, RunSettings] = {s.name: s for s in (CPU_DEMO, CARD_24GB, CARD_LARGE)}
SETTING_NAMES = (AUTO, *RUN_SETTINGS)


@dataclass(frozen=True)
class Machine:
    """What the run settings are chosen for: the device the models run on, and the models."""

    device: str  # "cpu" or "cuda"
    gpu_gib: float = 0.0  # total memory of the CUDA GPU
    gpu_name: str = ""
    tiny_models: bool = True  # the embedded tiny pack: nothing there needs GPU-sized work

    def describe(self) -> str:
        where = f"a {self.gpu_name or 'CUDA GPU'} with {self.gpu_gib:.0f} GiB" if self.device == "cuda" else "a CPU"
        return where + (" and the tiny pack" if self.tiny_models else "")


def pick_run_settings(setting: str, machine: Machine) -> RunSettings:
    """The named settings, or for `auto`: cpu-demo on a CPU or with the tiny pack, else by the card's memory."""
    if setting == AUTO:
        if machine.device != "cuda" or machine.tiny_models:
            return CPU_DEMO
        return CARD_LARGE if machine.gpu_gib >= CARD_LARGE.min_gpu_gib else CARD_24GB
    return RUN_SETTINGS[check_setting(setting)]


def check_setting(setting: str) -> str:
    """`setting` when it is auto or a settings name, else RunSettingsError with a did-you-mean."""
    if setting not in SETTING_NAMES:
        from difflib import get_close_matches

        close = get_close_matches(setting, SETTING_NAMES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RunSettingsError(f"run settings {setting!r} do not exist: {hint}set FLEN_RUN_SETTINGS (or --settings) "
                               f"to one of {', '.join(SETTING_NAMES)}")
    return setting


def refuse_misfit(settings: RunSettings, machine: Machine) -> str | None:
    """RunSettingsError when GPU-sized settings would run on a CPU; a warning line when the card looks too small."""
    if settings.min_gpu_gib is None:
        return None
    if machine.device != "cuda":
        raise RunSettingsError(f"run settings {settings.name!r} are sized for a CUDA GPU and this runs on a CPU: "
                               f"choose cpu-demo (FLEN_RUN_SETTINGS=cpu-demo, --settings cpu-demo, or the "
                               f"flywheel_cpu_demo job) or run on a GPU")
    if machine.gpu_gib < settings.min_gpu_gib:
        return (f"run settings {settings.name!r} expect at least {settings.min_gpu_gib:.0f} GiB and "
                f"{machine.describe()} has less: expect out-of-memory errors, or choose smaller settings")
    return None


def fill_knobs(settings: RunSettings, asset: str, given: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sized knobs of `asset`: unset (None or '') ones from the settings; also the ones the run overruled."""
    filled: dict[str, Any] = {}
    overruled: dict[str, Any] = {}
    for knob in SIZED_KNOBS.get(asset, ()):
        value = given.get(knob)
        if value is None or value == "":
            filled[knob] = settings.knobs[asset][knob]
        else:
            filled[knob] = value
            if value != settings.knobs[asset][knob]:
                overruled[knob] = value
    return filled, overruled

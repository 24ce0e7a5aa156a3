"""Named run settings: every set sizes the same knobs, auto picks by the machine, GPU sizes never run on a CPU."""

import pytest

from flen_resources.run_settings import (
    CARD_24GB,
    CARD_LARGE,
    CPU_DEMO,
    RUN_SETTINGS,
    SIZED_KNOBS,
    Machine,
    RunSettingsError,
    check_setting,
    fill_knobs,
    pick_run_settings,
    refuse_misfit,
)

CPU = Machine("cpu", tiny_models=False)
CARD_24 = Machine("cuda", 23.6, "NVIDIA GeForce RTX 4090", tiny_models=False)
H200 = Machine("cuda", 139.8, "NVIDIA H200", tiny_models=False)


@pytest.mark.parametrize("settings", RUN_SETTINGS.values(), ids=list(RUN_SETTINGS))
def test_every_set_gives_every_sized_knob(settings):
    assert {a: set(k) for a, k in settings.knobs.items()} == {a: set(k) for a, k in SIZED_KNOBS.items()}


def test_auto_is_cpu_demo_on_a_cpu_or_with_the_tiny_pack():
    assert pick_run_settings("auto", CPU) is CPU_DEMO
    assert pick_run_settings("auto", Machine("cuda", 139.8, "NVIDIA H200", tiny_models=True)) is CPU_DEMO


def test_auto_follows_the_cards_memory():
    assert pick_run_settings("auto", CARD_24) is CARD_24GB
    assert pick_run_settings("auto", H200) is CARD_LARGE


def test_a_named_set_is_taken_as_named():
    assert pick_run_settings("large-card", CARD_24) is CARD_LARGE


def test_an_unknown_name_gets_a_did_you_mean():
    with pytest.raises(RunSettingsError, match=r"'24gb-crad' do not exist: did you mean '24gb-card'\?"):
        check_setting("24gb-crad")
    assert check_setting("auto") == "auto"


@pytest.mark.parametrize("settings", [CARD_24GB, CARD_LARGE], ids=["24gb-card", "large-card"])
def test_gpu_sized_settings_are_refused_on_a_cpu(settings):
    with pytest.raises(RunSettingsError, match=f"'{settings.name}' are sized for a CUDA GPU and this runs on a CPU: "
                                               "choose cpu-demo"):
        refuse_misfit(settings, CPU)


def test_a_small_card_gets_a_warning_and_cpu_demo_runs_anywhere():
    assert "expect at least 40 GiB" in refuse_misfit(CARD_LARGE, CARD_24)
    assert refuse_misfit(CARD_24GB, CARD_24) is None
    assert refuse_misfit(CPU_DEMO, CPU) is None


def test_unset_knobs_come_from_the_settings_and_set_ones_are_kept():
    knobs, overruled = fill_knobs(CPU_DEMO, "flux_lora", {"steps": 50, "resolution": None, "rank": 8, "seed": 3})
    assert knobs == {"steps": 50, "resolution": 64, "rank": 8, "learning_rate": 1e-3, "checkpoint_every": 10}
    assert overruled == {"steps": 50}  # rank 8 is the settings' own value
    assert fill_knobs(CARD_LARGE, "enriched_images", {"recipe": ""})[0] == {"recipe": "angles"}


def test_run_config_names_the_settings_and_spells_out_the_knobs():
    config = CARD_24GB.run_config()
    assert config["resources"] == {"run_settings": {"config": {"name": "24gb-card"}}}
    assert config["ops"]["flux_lora"]["config"]["steps"] == 1500
    assert config["ops"]["lora_eval"]["config"]["seeds"] == [1, 2]

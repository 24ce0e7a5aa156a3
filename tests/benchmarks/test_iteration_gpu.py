"""benchmarks/iteration_gpu.py's arithmetic: the two-slice fit, the production counts, the 4090 projection."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import iteration_gpu as it  # noqa: E402


def test_two_slices_give_the_fixed_cost_and_the_cost_per_unit():
    fixed, per_unit = it.fit(4, 4 * 4.2 + 60, 12, 12 * 4.2 + 60)  # 60 s of loading, 4.2 s per edit
    assert fixed == pytest.approx(60) and per_unit == pytest.approx(4.2)
    assert it.project(fixed, per_unit, 40) == pytest.approx(60 + 40 * 4.2)
    with pytest.raises(ValueError, match="must count more"):
        it.fit(4, 10.0, 4, 10.0)


def test_production_counts_are_the_issue_s_iteration():
    counts = {s.asset: s.production for s in it.production_slices("full")}
    assert counts == {"enriched_images": 40, "qwen_adapter": 500, "flux_lora": 1500,
                      "lora_eval": 3 * 4 * 6 + 3, "synthetic_batch": 16}
    assert all(s.large > s.small for scale in ("full", "tiny") for s in it.production_slices(scale))


def test_the_4090_projection_scales_compute_by_throughput_and_loading_by_bandwidth():
    fixed, per_unit = it.on_card(48.0, 1.0, "fp8", it.H200, it.RTX_4090)
    assert per_unit == pytest.approx(1979 / 330.3) and fixed == pytest.approx(48.0 * 4.8 / 1.008)
    rows = [{"asset": "flux_lora", "fixed_s": 60.0, "per_unit_s": 0.4, "production": 1500, "work": "fp8",
             "projected_s": 660.0, "peak_card_gib": 15.0},
            {"asset": "enriched_images", "fixed_s": 60.0, "per_unit_s": 4.0, "production": 40, "work": "bf16",
             "projected_s": 220.0, "peak_card_gib": 21.0}]
    summary = it.summarize(rows, it.H200)
    assert summary["projected_iteration_min"] == pytest.approx(14.7, abs=0.05)
    assert summary["peak_card_gib_by_asset"] == {"flux_lora": 15.0, "enriched_images": 21.0}
    assert not summary["meets_goals"]  # 21 GiB is over the 20 GiB goal
    projection = summary["rtx_4090_projection"]
    assert projection["fits_24gb"] and "a projection, not a measurement" in projection["how"]
    assert projection["min_by_asset"]["flux_lora"] == pytest.approx(
        round((60 * 4.8 / 1.008 + 1500 * 0.4 * 1979 / 330.3) / 60, 1))
    assert it.known_card("NVIDIA H200") is it.H200 and it.known_card("cpu") is None


def test_an_iteration_with_an_asset_unmeasured_does_not_meet_the_goals():
    rows = [{"asset": a, "fixed_s": 10.0, "per_unit_s": 0.0, "production": 1, "work": "bf16", "projected_s": 10.0,
             "peak_card_gib": 10.0} for a in ("enriched_images", "flux_lora", "lora_eval", "synthetic_batch")]
    summary = it.summarize(rows, it.H200)
    assert not summary["meets_goals"] and summary["unmeasured"] == ["qwen_adapter"]
    rows.append({**rows[0], "asset": "qwen_adapter"})
    assert it.summarize(rows, it.H200)["meets_goals"]


def test_enrichment_slices_are_whole_cycles_of_the_angles_recipe():
    from flen_assets.recipe import builtin_recipe_path, load_recipe

    enrich = next(s for s in it.production_slices("full") if s.asset == "enriched_images")
    cycle = len(load_recipe(builtin_recipe_path("angles")).entries)
    assert it.RECIPE_CYCLE == cycle and enrich.small % cycle == 0 and enrich.large % cycle == 0


def test_every_slice_compiles_from_empty_caches_unless_they_are_asked_warm(tmp_path):
    (tmp_path / "cache" / "inductor").mkdir(parents=True)
    (tmp_path / "cache" / "inductor" / "kernel").write_text("a kernel from the slice before")
    env = it.compile_env(tmp_path / "cache", warm=True)
    assert (tmp_path / "cache" / "inductor" / "kernel").is_file()
    env = it.compile_env(tmp_path / "cache")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_asset_measured_alone_gets_its_input_from_a_rehearsal_phase():
    import rehearsal_gpu

    slices = {s.asset: s for s in it.production_slices("full")}
    for asset, (_, before, argument, _count) in it.INPUTS.items():
        assert before in rehearsal_gpu.PHASES and asset in rehearsal_gpu.PHASES
        assert slices[before].argument == argument


def test_a_paced_slice_s_fixed_cost_is_its_wall_less_its_units():
    assert it.paced(60, 215.3, 0.4) == pytest.approx((191.3, 0.4))
    assert it.paced(6, 10.0, 3.0) == (0.0, 3.0)  # never a negative fixed cost
    paced = {s.asset: s.paced for s in it.production_slices("full")}
    assert paced == {"enriched_images": False, "qwen_adapter": True, "flux_lora": True, "lora_eval": True,
                     "synthetic_batch": True}
    compiled = {s.asset for s in it.production_slices("full") if s.compiled}
    assert compiled == {"qwen_adapter", "flux_lora", "lora_eval", "synthetic_batch"}  # the enrichment runs eagerly
    from flen_resources.trainers.loop import LOG_EVERY

    # a trainer logs every LOG_EVERY steps: its slice spans two logged steps at least
    assert all(s.large >= 2 * LOG_EVERY for scale in ("full", "tiny") for s in it.production_slices(scale) if s.unit == "step")


def test_the_pace_leaves_the_first_unit_out_and_reads_a_trainer_s_logged_steps(capsys):
    import rehearsal_gpu

    # the start, then each message printed (and marked when a step): the first unit took the warm-up
    clock = iter([90.0, 95.0, 99.0, 100.0, 129.0, 130.0, 133.0, 134.0, 135.0])
    ticks = rehearsal_gpu.Ticks(clock=lambda: next(clock))
    for message in ("fixed-batch loss 1.2", "step 10/30 loss 0.9", "step 20/30 loss 0.8", "step 30/30 loss 0.7",
                    "saved"):
        ticks.trainer_log(message)
    assert ticks.at == [(10, 100.0), (20, 130.0), (30, 134.0)] and ticks.unit_s() == 1.7
    assert "[   39.0 s] step 20/30 loss 0.8" in capsys.readouterr().err
    one = rehearsal_gpu.Ticks()
    one.mark(2)
    assert one.unit_s() is None  # one mark: no pace


def test_a_timed_pipeline_marks_each_call_and_passes_the_rest_through():
    import rehearsal_gpu

    class Pipe:
        adapters = ["character"]

        def __call__(self, prompt):
            return f"image of {prompt}"

    ticks = rehearsal_gpu.Ticks()
    timed = rehearsal_gpu.TimedPipeline(Pipe(), ticks)
    assert timed("a") == "image of a" and timed("b") == "image of b" and timed.adapters == ["character"]
    assert [unit for unit, _ in ticks.at] == [1, 2] and ticks.unit_s() is not None


def test_a_tiny_run_on_the_cpu_paces_the_trainer_and_the_generator_in_process(tmp_path):
    import json

    out = tmp_path / "out"
    assert it.main(["--scale", "tiny", "--device", "cpu", "--res", "64", "--workdir", str(tmp_path / "work"),
                    "--out", str(out), "--only", "flux_lora,lora_eval"]) == 0
    rows = {r["asset"]: r for r in json.loads((out / "iteration_gpu-tiny-cpu.json").read_text())["assets"]}
    for asset, count in (("flux_lora", 20), ("lora_eval", 4)):
        row = rows[asset]
        assert row["per_unit_from"] == "in process" and [s["count"] for s in row["slices"]] == [count]
        assert row["per_unit_s"] == pytest.approx(row["slices"][0]["unit_s"], abs=1e-3) and row["per_unit_s"] > 0
        assert row["fixed_s"] == pytest.approx(row["slices"][0]["wall_s"] - count * row["per_unit_s"], abs=0.01)
    assert "step 20/20" in (out / "slice-logs" / "flux_lora-20.log").read_text()


def test_warm_caches_fill_them_with_an_untimed_slice_and_write_their_own_json(tmp_path):
    import json

    out = tmp_path / "out"
    assert it.main(["--scale", "tiny", "--device", "cpu", "--res", "64", "--workdir", str(tmp_path / "work"),
                    "--out", str(out), "--only", "lora_eval", "--caches", "warm"]) == 0
    report = json.loads((out / "iteration_gpu-warm-tiny-cpu.json").read_text())
    row = report["assets"][0]
    assert report["compile_caches"] == "warm" and row["compile_caches"] == "warm"
    assert row["cache_fill"]["count"] == 2 and row["cache_fill"]["wall_s"] > 0
    assert [s["count"] for s in row["slices"]] == [4] and "projected_s" in row
    assert not (out / "iteration_gpu-tiny-cpu.json").exists()  # the first iteration's file is another

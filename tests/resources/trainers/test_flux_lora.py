"""The FLUX LoRA trainer on the tiny pack (CPU): learning, loading, exact resume after a real kill,
the ComfyUI export at real FLUX dims, bad input and atomic writes."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from flen_resources.models.sources import resolve_model
from flen_resources.models.tiny_pack import ensure_tiny_pack
from flen_resources.trainers.comfy import export_flux_comfyui
from flen_resources.trainers.config import (
    COMPILED_ACTIVATION_BUDGET,
    FP8_KEPT_ACTIVATIONS,
    OPTIMIZERS,
    TRAINER_VERSION,
    LoraTrainConfig,
    TrainingError,
    all_kept_reserve_gib,
    auto_activation_budget,
    auto_kept_activations,
    auto_optimizer,
    checkpoint_interval,
)
from flen_resources.trainers.flux_lora import FluxLoraTrainer, TrainItem
from flen_resources.trainers.lora_files import save_lora_file

FLEN = [sys.executable, "-m", "flen_assets"]
# One torch thread: the tiny model gains nothing from more, and on a shared 2-core machine spinning
# OpenMP workers of concurrent runs slow each other down tenfold.
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
TRAIN_ARGS = ["--resolution", "64", "--rank", "8", "--quantization", "none", "--optimizer", "adamw", "--lr", "1e-2",
              "--model", "tiny", "--seed", "3"]


def _config(**overrides) -> LoraTrainConfig:
    base = dict(resolution=64, rank=8, alpha=8.0, quantization="none", optimizer="adamw", learning_rate=1e-2,
                lr_warmup_steps=0, sample_every=0, max_steps=30, checkpoint_every=10, device="cpu")
    return LoraTrainConfig(**{**base, **overrides})


def _write_images(folder: Path, n: int, captions: bool = True) -> list[Path]:
    """n small distinct images (colour gradients with a square), with .txt captions next to them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for i in range(n):
        ramp = np.linspace(0, 1, 64)[None, :, None] * rng.uniform(0, 255, 3)[None, None, :]
        img = np.broadcast_to(ramp, (64, 64, 3)).copy()
        x, y = rng.integers(0, 40, 2)
        img[y:y + 24, x:x + 24] = rng.uniform(0, 255, 3)
        path = folder / f"img{i:02d}.png"
        Image.fromarray(img.astype(np.uint8)).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"photo of alice_flen, pose {i}\n")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training_set partition folder: images/<id>.png + images/<id>.txt."""
    ensure_tiny_pack()  # built once here, never raced by the subprocesses below
    root = tmp_path_factory.mktemp("trainset") / "alice" / "v1"
    _write_images(root / "images", 4)
    return root


def _items(dataset: Path) -> list[TrainItem]:
    return [TrainItem(p, p.with_suffix(".txt").read_text().strip()) for p in sorted((dataset / "images").glob("*.png"))]


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """One 30-step overfitting run, shared by the tests that only read its result."""
    trainer = FluxLoraTrainer(model="tiny", work_dir=tmp_path_factory.mktemp("run") / "alice-v1", log=lambda _: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see ENV
    try:
        return trainer.train(_items(dataset), _config(), name="alice_v1", dataset_md5="abc123")
    finally:
        torch.set_num_threads(threads)


# -- (a) it learns --------------------------------------------------------------------------------
def test_loss_falls_when_overfitting(trained):
    assert trained.steps == 30 and trained.resumed_from == 0 and len(trained.losses) == 30
    assert trained.eval_loss_end < trained.eval_loss_start * 0.95, (trained.eval_loss_start, trained.eval_loss_end)
    assert trained.loss_curve.is_file() and trained.loss_curve.stat().st_size > 1000
    assert trained.cache_misses > 0


# -- (b) the LoRA file loads into a plain FluxPipeline ----------------------------------------------
def test_lora_loads_into_flux_pipeline_and_unloads(trained):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(resolve_model("flux.1-dev", "tiny").path), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)

    def render() -> np.ndarray:
        return pipe("photo of alice_flen", width=64, height=64, num_inference_steps=2, max_sequence_length=64,
                    generator=torch.Generator().manual_seed(5), output_type="np").images[0]

    base = render()
    pipe.load_lora_weights(str(trained.lora_path), adapter_name="alice")
    with_lora = render()
    pipe.unload_lora_weights()
    after = render()
    assert np.abs(with_lora - base).max() > 1e-3, "the trained LoRA changes nothing"
    assert np.array_equal(after, base), "unloading the LoRA did not restore the base model"

    with safe_open(str(trained.lora_path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["flenwheel.base_model"].startswith("tiny/flux.1-dev")
    assert meta["flenwheel.dataset_md5"] == "abc123"
    assert json.loads(meta["flenwheel.config"])["rank"] == 8
    assert meta["flenwheel.step"] == "30"
    assert meta["flenwheel.trainer_version"] == TRAINER_VERSION
    assert meta["flenwheel.key_style"] == "diffusers"
    with safe_open(str(trained.comfyui_path), framework="pt") as fh:
        assert fh.metadata()["flenwheel.key_style"] == "comfyui"
        assert all(k.startswith("lora_unet_") for k in fh.keys())


def test_every_checkpoint_keeps_a_lora_for_evaluation(trained):
    assert [step for step, _ in trained.checkpoints] == [10, 20, 30]
    final = trained.checkpoints[-1][1]
    assert final.read_bytes() == trained.lora_path.read_bytes(), "the last snapshot is the final LoRA"
    assert trained.checkpoints[0][1].read_bytes() != final.read_bytes()
    for step, path in trained.checkpoints:
        with safe_open(str(path), framework="pt") as fh:
            assert fh.metadata()["flenwheel.step"] == str(step)
        comfy = path.with_name(f"step-{step:06d}_comfyui.safetensors")
        with safe_open(str(comfy), framework="pt") as fh:
            assert fh.metadata()["flenwheel.key_style"] == "comfyui"


# -- (c) exact resume after SIGKILL ---------------------------------------------------------------
def _train_cmd(dataset: Path, out: Path) -> list[str]:
    # No --checkpoint-every: the README's example relies on the default (a quarter of a short run).
    return [*FLEN, "train", "flux", str(dataset), "--out", str(out), "--steps", "40", "--name", "k", *TRAIN_ARGS]


def _complete_steps(checkpoints: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in checkpoints.glob("step-*") if (p / "state.json").is_file())


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(dataset: Path, tmp_path: Path):
    straight = subprocess.run(_train_cmd(dataset, tmp_path / "straight"), env=ENV, capture_output=True, text=True,
                              timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "resumed" not in straight.stdout

    killed_dir = tmp_path / "killed"
    checkpoints = killed_dir / "checkpoints"
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(_train_cmd(dataset, killed_dir), env=ENV, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if checkpoints.is_dir() and any(s >= 10 for s in _complete_steps(checkpoints)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "killed.log").read_text()[-2000:]
        os.kill(proc.pid, 9)
        proc.wait(timeout=30)
    assert proc.returncode == -9
    latest = max(_complete_steps(checkpoints))
    assert 10 <= latest < 40, latest
    assert not (killed_dir / "output" / "k.safetensors").exists()
    # What a kill during a checkpoint write leaves: a temp folder, newer than any checkpoint and corrupt.
    stale = checkpoints / ".tmp-000039-dead00"
    stale.mkdir(exist_ok=True)
    (stale / "lora.safetensors").write_bytes(b"\x00garbage")
    (stale / "state.json").write_text('{"step": 39}')

    resumed = subprocess.run(_train_cmd(dataset, killed_dir), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    match = re.search(r"resumed from step-(\d{6})", resumed.stdout)
    assert match, resumed.stdout
    assert int(match.group(1)) == latest, "the resumed run did not start from the newest complete checkpoint"
    assert f"(resumed from step {latest})" in resumed.stdout
    assert not list(checkpoints.glob(".tmp-*")), "half-written checkpoint folders were left behind"

    a = load_file(str(tmp_path / "straight" / "output" / "k.safetensors"))
    b = load_file(str(killed_dir / "output" / "k.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k), "nothing was trained"


# -- (d) the ComfyUI export at real FLUX dims, checked through diffusers' kohya converter ---------
DOUBLE_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
SINGLE_MODULES = ["to_q", "to_k", "to_v"]


def test_comfyui_export_round_trips_through_diffusers(tmp_path: Path):
    from diffusers import FluxPipeline

    config = SimpleNamespace(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128)
    inner, rank, alpha = 3072, 2, 4.0  # alpha != rank: the scale must survive the trip
    gen = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    modules = [f"transformer_blocks.{i}.attn.{m}" for i in range(19) for m in DOUBLE_MODULES]
    modules += [f"single_transformer_blocks.{i}.attn.{m}" for i in range(38) for m in SINGLE_MODULES]
    for module in modules:
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, inner, generator=gen) * 0.05
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(inner, rank, generator=gen) * 0.05
    path = export_flux_comfyui(state, config, alpha, tmp_path / "x_comfyui.safetensors",
                               {"flenwheel.key_style": "comfyui"})
    with safe_open(str(path), framework="pt") as fh:
        assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in fh.keys())

    converted = FluxPipeline.lora_state_dict(str(path))
    converted = converted[0] if isinstance(converted, tuple) else converted
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in converted.items() if k.endswith(".alpha")}

    def factors(sd: dict[str, torch.Tensor], module: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(B * scale, A) in float64: the effective weight delta is their product."""
        return sd[f"{module}.lora_B.weight"].double() * scale, sd[f"{module}.lora_A.weight"].double()

    def gram(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
        """<B1 A1, B2 A2> (Frobenius) = tr(B1^T B2 A2 A1^T), without forming 3072 x 3072 matrices."""
        return float(torch.trace(b1.T @ b2 @ a2 @ a1.T))

    seen = set()
    for module in modules:
        name = f"transformer.{module}"
        assert f"{name}.lora_A.weight" in converted, f"the converter dropped {name}"
        a_rank = converted[f"{name}.lora_A.weight"].shape[0]
        expected = factors(state, name, alpha / rank)
        got = factors(converted, name, alphas.get(name, a_rank) / a_rank)  # no alpha: diffusers folded the scale in
        norm2 = gram(*expected, *expected)
        err2 = norm2 + gram(*got, *got) - 2 * gram(*expected, *got)  # ||got - expected||_F^2
        err = max(err2, 0.0) ** 0.5 / norm2 ** 0.5
        assert err < 1e-2, f"{name}: relative error {err:.4f}"
        seen.add(name)
    # Modules the export padded with zero blocks (proj_mlp of linear1) must convert to a zero delta.
    extra = {k.rsplit(".lora_", 1)[0] for k in converted if ".lora_" in k} - seen
    for name in extra:
        assert gram(*factors(converted, name, 1.0), *factors(converted, name, 1.0)) == 0, name


def test_a_resumed_run_keeps_the_optimizer_its_checkpoint_was_saved_with(dataset: Path, tmp_path: Path):
    """An 8-bit AdamW checkpoint cannot load into torch's AdamW: a run resumed after `auto` changed keeps its own."""
    items = _items(dataset)
    said = []
    trainer = FluxLoraTrainer(model="tiny", work_dir=tmp_path / "run", log=said.append)
    trainer.train(items, _config(max_steps=2, checkpoint_every=1, optimizer="adamw8bit"), name="k")
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["config"]["optimizer"] == "adamw8bit"
    said.clear()
    trainer.train(items, _config(max_steps=3, checkpoint_every=1, optimizer="adamw"), name="k")
    assert "resuming with the checkpoint's optimizer adamw8bit, not adamw" in said
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["config"]["optimizer"] == "adamw8bit"


# -- (e) bad input ----------------------------------------------------------------------------------
def test_bad_input_raises_training_error(tmp_path: Path):
    trainer = FluxLoraTrainer(model="tiny", work_dir=tmp_path / "run", log=lambda _: None)
    paths = _write_images(tmp_path / "imgs", 4, captions=False)
    with pytest.raises(TrainingError, match="at least 4"):
        trainer.train([TrainItem(p, "x") for p in paths[:3]], _config())
    with pytest.raises(TrainingError, match="missing.*gone.png"):
        trainer.train([TrainItem(p, "x") for p in paths[:3]] + [TrainItem(tmp_path / "gone.png", "x")], _config())
    with pytest.raises(TrainingError, match="no caption"):
        trainer.train([TrainItem(p) for p in paths], _config(), default_caption="")
    assert not (tmp_path / "run").exists(), "a refused run must not create its folder"


def test_checkpoint_interval_lets_every_run_resume():
    assert checkpoint_interval(1500) == 250 and checkpoint_interval(40) == 10 and checkpoint_interval(3) == 1
    assert checkpoint_interval(40, 5) == 5 and checkpoint_interval(40, 100) == 40 and checkpoint_interval(1) == 1


def test_an_unknown_optimizer_is_refused_by_name():
    assert OPTIMIZERS == ("auto", "adamw8bit", "adamw")
    with pytest.raises(TrainingError, match="optimizer must be one of auto, adamw8bit, adamw, not 'sgd'"):
        LoraTrainConfig(optimizer="sgd")


def test_auto_settings_are_decided_for_the_device():
    cpu = LoraTrainConfig(device="cpu").resolved()
    assert (cpu.quantization, cpu.optimizer, cpu.compile, cpu.kept_activations) == ("none", "adamw", False, 0)
    assert cpu.activation_budget == 1.0
    fp8 = LoraTrainConfig(device="cpu", quantization="fp8").resolved()  # not compiled on a CPU: the budget can't act
    assert (fp8.optimizer, fp8.kept_activations, fp8.activation_budget) == ("adamw", FP8_KEPT_ACTIVATIONS, 1.0)
    assert LoraTrainConfig(device="cpu", quantization="fp8", kept_activations=2).resolved().kept_activations == 2
    assert LoraTrainConfig(device="cpu", quantization="fp8").resolved(memory_budget_gib=12).kept_activations == 0
    assert LoraTrainConfig(device="cpu", activation_budget=0.5).resolved().activation_budget == 0.5
    assert LoraTrainConfig(device="cpu", optimizer="adamw8bit").resolved().optimizer == "adamw8bit"
    with pytest.raises(TrainingError, match="nf4 .*needs a CUDA GPU"):
        LoraTrainConfig(device="cpu", quantization="nf4").resolved()
    with pytest.raises(TrainingError, match="quantization 'int3' is not one of auto, none, nf4"):
        LoraTrainConfig(device="cpu", quantization="int3").resolved()


def test_auto_optimizer_and_kept_activations_follow_the_base():
    """8-bit states where memory is tight (nf4 on a GPU); fused AdamW and kept blocks where fp8 leaves room."""
    assert auto_optimizer("nf4", cuda=True) == "adamw8bit" and auto_optimizer("none", cuda=True) == "adamw8bit"
    assert auto_optimizer("fp8", cuda=True) == "adamw" and auto_optimizer("none", cuda=False) == "adamw"
    assert auto_kept_activations("fp8", fits_budget=True, all_fit=True) == "all"
    assert auto_kept_activations("fp8", fits_budget=True, all_fit=False) == FP8_KEPT_ACTIVATIONS == 8
    assert auto_kept_activations("fp8", fits_budget=False, all_fit=False) == 0, "fp8 by hand on a small budget"
    assert auto_kept_activations("nf4", True, True) == auto_kept_activations("none", True, True) == 0


def test_a_compiled_fp8_run_on_a_gpu_keeps_every_block_where_they_fit(monkeypatch):
    """resolved() as on an H200 (a CUDA device with fp8 matmuls), checked on the CPU."""
    import flen_resources.models.fp8_linear as fp8_linear
    import flen_resources.models.pipelines as pipelines
    import flen_resources.models.quantization as quantization

    monkeypatch.setattr(pipelines, "pick_device", lambda _: torch.device("cuda"))
    monkeypatch.setattr(fp8_linear, "fp8_matmuls", lambda _: True)
    monkeypatch.setattr(fp8_linear, "_compiler_works", {"cuda": True})  # the card's probe, as on an H200
    monkeypatch.setattr(quantization, "host_memory_gib", lambda: 128.0)  # the H200 machine's host

    def settled(**knobs) -> tuple:
        config = LoraTrainConfig(**knobs).resolved()
        return config.quantization, config.kept_activations, config.activation_budget

    assert settled() == ("fp8", "all", COMPILED_ACTIVATION_BUDGET)
    assert settled(resolution=1280) == ("fp8", FP8_KEPT_ACTIVATIONS, 1.0), "the activations would pass 20 GiB"
    assert settled(batch_size=2) == ("fp8", FP8_KEPT_ACTIVATIONS, 1.0)
    assert settled(compile=False) == ("fp8", FP8_KEPT_ACTIVATIONS, 1.0), "eager: no partitioner to recompute"
    assert settled(kept_activations=0) == ("fp8", 0, 1.0)
    assert settled(activation_budget=0.35) == ("fp8", "all", 0.35)
    assert settled(quantization="nf4") == ("nf4", 0, 1.0)
    monkeypatch.setattr(fp8_linear, "_compiler_works", {"cuda": False})  # no Triton or C compiler on this machine
    assert settled() == ("fp8", FP8_KEPT_ACTIVATIONS, 1.0) and LoraTrainConfig().resolved().compile is False


def test_every_block_is_kept_only_where_its_activations_fit_the_budget():
    """FLUX.1-dev's fp8 weights (11.08 GiB) + 5.6 GiB of activations at 1024² + 1.5 of slack: 18.2 of 20 GiB."""
    from flen_resources.models.quantization import fp8_fits
    from flen_resources.models.registry import MODELS

    flux = MODELS["flux.1-dev"].transformer_params
    assert all_kept_reserve_gib(1024, 1) == pytest.approx(7.1)
    assert all_kept_reserve_gib(512, 1) == pytest.approx(1.4 + 1.5) and all_kept_reserve_gib(1024, 2) > 12
    assert fp8_fits(flux, 20, all_kept_reserve_gib(1024, 1)), "the default run keeps every block on a 24 GB card"
    assert not fp8_fits(flux, 20, all_kept_reserve_gib(1280, 1)), "1280²: 8.75 GiB more would pass the budget"
    assert not fp8_fits(flux, 20, all_kept_reserve_gib(1024, 2)), "a batch of 2 doubles the activations"
    assert not fp8_fits(flux, 18, all_kept_reserve_gib(1024, 1)) and fp8_fits(flux, 18)


def test_the_compiler_recomputes_only_when_no_block_is_checkpointed():
    """The activation budget is the compiled blocks' recomputation; with whole-block checkpoints torch's default."""
    assert auto_activation_budget("all", compiled=True) == COMPILED_ACTIVATION_BUDGET == 0.2
    assert auto_activation_budget("all", compiled=False) == 1.0, "eager blocks: no partitioner to obey it"
    assert auto_activation_budget(8, compiled=True) == auto_activation_budget(0, compiled=True) == 1.0


def test_knobs_give_the_same_config_to_the_cli_and_the_assets():
    config = LoraTrainConfig.from_knobs(steps=20, rank=8, learning_rate=1e-3, resolution=64, optimizer="auto",
                                        checkpoint_every=None)
    assert (config.alpha, config.lr_warmup_steps, config.checkpoint_every) == (8.0, 2, 5)
    assert LoraTrainConfig.from_knobs(steps=1500, rank=16, learning_rate=1e-4, resolution=1024, optimizer="auto",
                                      checkpoint_every=None).lr_warmup_steps == LoraTrainConfig.lr_warmup_steps


def test_cli_reads_flat_folder_and_fails_cleanly(tmp_path: Path):
    from flen_resources.datasets import dataset_items

    flat = tmp_path / "flat"
    paths = _write_images(flat, 3, captions=False)
    paths[0].with_suffix(".txt").write_text("photo of bob\n")
    (flat / "notes.md").write_text("not an image")
    items, md5 = dataset_items(flat)
    assert [i.image for i in items] == paths and [i.caption for i in items] == ["photo of bob", None, None]
    assert len(md5) == 32

    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, expected in ((empty, "0 image(s)"), (flat, "3 image(s)"), (tmp_path / "nope", "not a folder")):
        proc = subprocess.run([*FLEN, "train", "flux", str(folder), "--out", str(tmp_path / "run"), *TRAIN_ARGS],
                              env=ENV, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert "error:" in proc.stderr and expected in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout


# -- (f) a failed write never corrupts the final file --------------------------------------------------
def test_failed_write_keeps_previous_lora(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import safetensors.torch

    path = tmp_path / "out" / "alice_v1.safetensors"
    old = {"a.lora_A.weight": torch.ones(2, 4)}
    save_lora_file(path, old, {"flenwheel.step": "10"})
    before = path.read_bytes()
    new = {"a.lora_A.weight": torch.zeros(2, 4), "b.lora_A.weight": torch.zeros(64, 64)}

    def broken_save(*args, **kwargs):
        raise RuntimeError("serialisation failed")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save", broken_save)
        with pytest.raises(RuntimeError, match="serialisation"):
            save_lora_file(path, new, {"flenwheel.step": "20"})

    real_write_bytes = Path.write_bytes

    def half_write(self: Path, data: bytes) -> int:
        """Half the bytes land, then the write fails as a full disk does."""
        real_write_bytes(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:  # save_lora_file writes through flen_resources.atomic (Path.write_bytes)
        m.setattr(Path, "write_bytes", half_write)
        with pytest.raises(OSError, match="No space"):
            save_lora_file(path, new, {"flenwheel.step": "20"})

    assert path.read_bytes() == before
    assert torch.equal(load_file(str(path))["a.lora_A.weight"], old["a.lora_A.weight"])
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "partial or temp files were left behind"

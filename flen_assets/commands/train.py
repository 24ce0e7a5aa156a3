"""`flen train flux`: train a LoRA on a folder of captioned images, outside any project."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from flen_assets.commands.common import SettingsOpt, check_settings, error_line, fail
from flen_assets.console import traces_shown
from flen_resources.models.quantization import QuantizationSettingWithFp8
from flen_resources.trainers.config import Attention, LoraTrainConfig, Optimizer

app = typer.Typer(help="Train LoRAs on a folder of captioned images.", no_args_is_help=True)


@app.command("flux")
def train_flux(
    dataset: Annotated[Path, typer.Argument(help="Folder of images with same-name .txt captions (or a training_set "
                                                 "partition folder: images/<id>.png + .txt).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints, cache, output/ (reused to resume).")],
    # The same knobs, defaults and rules as the LoRA assets' config (LoraTrainConfig.from_knobs).
    # Unset sized knobs come from the run settings (--settings), as in the flux_lora asset.
    steps: Annotated[Optional[int], typer.Option(min=1, help="Default: the run settings'.")] = None,
    resolution: Annotated[Optional[int], typer.Option(min=64, help="Default: the run settings'.")] = None,
    rank: Annotated[Optional[int], typer.Option(min=1, help="Default: the run settings'.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate. Default: the run settings'.")] = None,
    settings: SettingsOpt = None,
    quantization: Annotated[QuantizationSettingWithFp8, typer.Option(
        envvar="FLEN_QUANTIZATION", help="auto: fp8 on an Ada/Hopper GPU when the model fits FLEN_MEMORY_BUDGET_GIB "
                                         "in fp8 and the RAM holds it in bf16 while it quantizes, else nf4 (QLoRA) "
                                         "on a CUDA GPU; none on the CPU.")] = "auto",
    optimizer: Annotated[Optimizer, typer.Option(
        help="auto: 8-bit AdamW on a CUDA GPU with an nf4 base, fused AdamW with fp8, AdamW on the CPU.")] = LoraTrainConfig.optimizer,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        min=0, help="Steps between checkpoints; 0: 250, or a quarter of --steps when fewer. Default: the run "
                    "settings'.")] = None,
    seed: int = LoraTrainConfig.seed,
    compile: Annotated[bool, typer.Option(help="torch.compile the transformer blocks (GPU only).")]
    = LoraTrainConfig.compile,
    attention: Annotated[Attention, typer.Option(
        help="Attention kernel on a GPU: cuDNN, torch's flash SDPA, or auto (cuDNN on Hopper and newer).")]
    = LoraTrainConfig.attention,
    memory_budget_gib: Annotated[Optional[float], typer.Option(
        envvar="FLEN_MEMORY_BUDGET_GIB", min=0, help="Card memory the run may take (quantization auto); default 20.")]
    = None,
    model: Annotated[str, typer.Option(envvar="FLEN_FLUX_MODEL", help="'tiny', a folder or a Hub id.")] = "tiny",
    device: Annotated[str, typer.Option(envvar="FLEN_DEVICE", help="auto: the CUDA GPU when there is one.")] = "auto",
    name: Annotated[str, typer.Option(help="File name of the LoRA (default: the --out folder's name).")] = "",
    default_caption: Annotated[str, typer.Option(help="Caption of images without a .txt ('' to require one).")]
    = "photo of a person",
) -> None:
    """Train a FLUX.1-dev LoRA on DATASET; rerun the same command to resume from the last checkpoint."""
    from flen_resources.datasets import dataset_items
    from flen_resources.models.sources import ModelFolderError, ModelNotAvailable
    from flen_resources.trainers.config import TrainingError
    from flen_resources.trainers.flux_lora import FluxLoraTrainer

    if not dataset.is_dir():
        fail(f"{dataset} is not a folder")
    items, md5 = dataset_items(dataset)
    knobs = sized_knobs(settings, model, device, dict(steps=steps, resolution=resolution, rank=rank, learning_rate=lr,
                                                      checkpoint_every=checkpoint_every))
    config = LoraTrainConfig.from_knobs(**knobs, optimizer=optimizer, seed=seed, compile=compile, attention=attention,
                                        quantization=quantization, device=device)
    trainer = FluxLoraTrainer(model=model, work_dir=out, log=typer.echo, memory_budget_gib=memory_budget_gib)
    try:
        result = trainer.train(items, config, name=name or out.resolve().name, default_caption=default_caption,
                               dataset_md5=md5)
    except (TrainingError, ModelNotAvailable, ModelFolderError) as exc:
        if traces_shown():  # the rest of the message: how to download a missing model
            typer.echo(str(exc), err=True)
        fail(f"{dataset}: {error_line(exc)}")
    typer.echo(f"trained {result.steps} steps in {result.seconds:.0f}s"
               + (f" (resumed from step {result.resumed_from})" if result.resumed_from else ""))
    typer.echo(f"  LoRA (diffusers):  {result.lora_path}")
    typer.echo(f"  LoRA (ComfyUI):    {result.comfyui_path}")
    typer.echo(f"  loss curve:        {result.loss_curve}")


def sized_knobs(settings: str | None, model: str, device: str, given: dict) -> dict:
    """The flux_lora knobs: those given, the rest from the run settings (one line says which); misfits refused."""
    from flen_resources.models.pipelines import probe_machine
    from flen_resources.run_settings import (
        RUN_SETTINGS_ENV,
        RunSettingsError,
        fill_knobs,
        pick_run_settings,
        refuse_misfit,
    )

    name = check_settings(settings or os.environ.get(RUN_SETTINGS_ENV) or "auto")
    machine = probe_machine(device, [model])
    chosen = pick_run_settings(name, machine)
    try:
        warning = refuse_misfit(chosen, machine)
    except RunSettingsError as exc:
        fail(str(exc).replace("(FLEN_RUN_SETTINGS=cpu-demo, --settings cpu-demo, or the flywheel_cpu_demo job)",
                              "(--settings cpu-demo)"))
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    knobs, overruled = fill_knobs(chosen, "flux_lora", given)
    how = f"auto: {machine.describe()}" if name == "auto" else "chosen"
    typer.echo(f"run settings {chosen.name} ({how}): " + ", ".join(f"{k} {v}" for k, v in knobs.items())
               + (" (given: " + ", ".join(overruled) + ")" if overruled else ""))
    return knobs


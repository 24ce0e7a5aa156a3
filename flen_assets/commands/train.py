"""`flen train flux`: train a LoRA on a folder of captioned images, outside any project."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flen_assets.commands.common import error_line, fail
from flen_assets.console import traces_shown
from flen_resources.models.quantization import QuantizationSetting
from flen_resources.trainers.config import Attention, LoraTrainConfig, Optimizer

app = typer.Typer(help="Train LoRAs on a folder of captioned images.", no_args_is_help=True)


@app.command("flux")
def train_flux(
    dataset: Annotated[Path, typer.Argument(help="Folder of images with same-name .txt captions (or a training_set "
                                                 "partition folder: images/<id>.png + .txt).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints, cache, output/ (reused to resume).")],
    # The same knobs, defaults and rules as the LoRA assets' config (LoraTrainConfig.from_knobs).
    steps: Annotated[int, typer.Option(min=1)] = LoraTrainConfig.max_steps,
    resolution: Annotated[int, typer.Option(min=64)] = LoraTrainConfig.resolution,
    rank: Annotated[int, typer.Option(min=1)] = LoraTrainConfig.rank,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = LoraTrainConfig.learning_rate,
    quantization: Annotated[QuantizationSetting, typer.Option(
        envvar="FLEN_QUANTIZATION", help="auto: nf4 (QLoRA) on a CUDA GPU, none on the CPU.")] = "auto",
    optimizer: Annotated[Optimizer, typer.Option(
        help="auto: 8-bit AdamW on a CUDA GPU, AdamW on the CPU.")] = LoraTrainConfig.optimizer,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        min=1, help="Steps between checkpoints (default: 250, or a quarter of --steps when fewer).")] = None,
    seed: int = LoraTrainConfig.seed,
    compile: Annotated[bool, typer.Option(help="torch.compile the transformer blocks (GPU only).")]
    = LoraTrainConfig.compile,
    attention: Annotated[Attention, typer.Option(
        help="Attention kernel on a GPU: cuDNN, torch's flash SDPA, or auto (cuDNN on Hopper and newer).")]
    = LoraTrainConfig.attention,
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
    config = LoraTrainConfig.from_knobs(steps=steps, rank=rank, learning_rate=lr, resolution=resolution,
                                        optimizer=optimizer, checkpoint_every=checkpoint_every, seed=seed,
                                        compile=compile, attention=attention, quantization=quantization, device=device)
    trainer = FluxLoraTrainer(model=model, work_dir=out, log=typer.echo)
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

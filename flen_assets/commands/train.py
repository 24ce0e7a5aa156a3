"""`flen train flux`: train a LoRA on a folder of captioned images, outside any project."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from flen_assets.commands.common import fail

app = typer.Typer(help="Train LoRAs on a folder of captioned images.", no_args_is_help=True)


@app.command("flux")
def train_flux(
    dataset: Annotated[Path, typer.Argument(help="Folder of images with same-name .txt captions (or a training_set "
                                                 "partition folder: images/<id>.png + .txt).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints, cache, output/ (reused to resume).")],
    steps: Annotated[int, typer.Option(min=1)] = 1500,
    resolution: Annotated[int, typer.Option(min=64)] = 1024,
    rank: Annotated[int, typer.Option(min=1)] = 16,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    quantization: Annotated[Literal["none", "nf4"], typer.Option(help="nf4 (QLoRA) needs a CUDA GPU.")] = "nf4",
    optimizer: Annotated[Literal["adamw", "adamw8bit"], typer.Option()] = "adamw8bit",
    checkpoint_every: Annotated[Optional[int], typer.Option(
        min=1, help="Steps between checkpoints (default: 250, or a quarter of --steps when fewer).")] = None,
    seed: int = 0,
    compile: Annotated[bool, typer.Option(help="torch.compile the transformer blocks (GPU only).")] = True,
    attention: Annotated[Literal["auto", "cudnn", "flash"], typer.Option(
        help="Attention kernel on a GPU: cuDNN, torch's flash SDPA, or auto (cuDNN on Hopper and newer).")] = "auto",
    model: Annotated[str, typer.Option(envvar="FLEN_FLUX_MODEL", help="'tiny', a folder or a Hub id.")] = "tiny",
    name: Annotated[str, typer.Option(help="File name of the LoRA (default: the --out folder's name).")] = "",
    default_caption: Annotated[str, typer.Option(help="Caption of images without a .txt ('' to require one).")]
    = "photo of a person",
) -> None:
    """Train a FLUX.1-dev LoRA on DATASET; rerun the same command to resume from the last checkpoint."""
    from flen_resources.datasets import dataset_items
    from flen_resources.models.sources import ModelFolderError, ModelNotAvailable
    from flen_resources.trainers.config import LoraTrainConfig, TrainingError, checkpoint_interval
    from flen_resources.trainers.flux_lora import FluxLoraTrainer

    if not dataset.is_dir():
        fail(f"{dataset} is not a folder")
    items, md5 = dataset_items(dataset)
    config = LoraTrainConfig(max_steps=steps, resolution=resolution, rank=rank, alpha=float(rank), learning_rate=lr,
                             quantization=quantization, optimizer=optimizer,
                             checkpoint_every=checkpoint_interval(steps, checkpoint_every),
                             seed=seed, compile=compile, attention=attention)
    trainer = FluxLoraTrainer(model=model, work_dir=out, log=typer.echo)
    try:
        result = trainer.train(items, config, name=name or out.resolve().name, default_caption=default_caption,
                               dataset_md5=md5)
    except (TrainingError, ModelNotAvailable, ModelFolderError) as exc:
        fail(f"{dataset}: {exc}")
    typer.echo(f"trained {result.steps} steps in {result.seconds:.0f}s"
               + (f" (resumed from step {result.resumed_from})" if result.resumed_from else ""))
    typer.echo(f"  LoRA (diffusers):  {result.lora_path}")
    typer.echo(f"  LoRA (ComfyUI):    {result.comfyui_path}")
    typer.echo(f"  loss curve:        {result.loss_curve}")

"""`flen models tiny | status`: the embedded tiny pack and which real models are available."""

from __future__ import annotations

import time
from typing import Annotated

import typer

app = typer.Typer(help="Model weights: the embedded tiny pack and real models.", no_args_is_help=True)


@app.command("tiny")
def models_tiny(force: Annotated[bool, typer.Option(help="Rebuild even if present.")] = False) -> None:
    """Build the embedded tiny model pack offline (random weights, real architectures)."""
    from flen_resources.models.tiny_pack import ensure_tiny_pack

    started = time.time()
    path = ensure_tiny_pack(force=force)
    typer.echo(f"tiny pack at {path} ({time.time() - started:.1f}s)")
    for item in sorted(path.iterdir()):
        typer.echo(f"  {item.name}")


@app.command("status")
def models_status() -> None:
    """Which models and LoRAs are available, from where (never downloads)."""
    from flen_assets.definitions import defs
    from flen_resources.models.loras import LoraError, resolve_lora
    from flen_resources.models.registry import DEFAULT_EDIT_MODEL, LORAS, MODELS
    from flen_resources.models.sources import ModelFolderError, ModelNotAvailable, models_dir, resolve_model

    editor = defs.resources["editor"]
    models = defs.resources["models"].read_now()
    typer.echo(f"FLENwheel models folder: {models_dir()}")
    typer.echo(f"quantization: {models.quantization}, device: {models.device} (FLEN_QUANTIZATION, FLEN_DEVICE)")
    _echo_run_settings(models)
    for key, spec in MODELS.items():
        source = models.source(key)
        try:
            resolved = resolve_model(key, source, allow_download=False)
            typer.secho(f"✓ {key:22s} {source:32s} {resolved.kind:6s} {resolved.path}  ({resolved.ref})",
                        fg=typer.colors.GREEN)
        except (ModelNotAvailable, ModelFolderError) as exc:
            typer.secho(f"✗ {key:22s} {source:32s} {str(exc).splitlines()[0]}", fg=typer.colors.RED)
        if source != spec.hub_id:
            typer.echo(f"  real model: {spec.hub_id} (set {spec.setting})")
    for name, source in editor.qwen_loras.items():
        try:
            model = LORAS[name].model if name in LORAS else DEFAULT_EDIT_MODEL
            info = resolve_lora(name, source, model, allow_download=False)
            typer.echo(f"✓ LoRA {name:20s} {source:32s} {info.key_style}, rank {info.rank}, {info.path}")
        except (LoraError, ModelNotAvailable) as exc:
            typer.secho(f"✗ LoRA {name:20s} {source:32s} {str(exc).splitlines()[0]}", fg=typer.colors.RED)


def _echo_run_settings(models) -> None:
    """The run settings a run would pick here (FLEN_RUN_SETTINGS, else auto), and why."""
    import os

    from flen_resources.models.pipelines import probe_machine
    from flen_resources.run_settings import AUTO, RUN_SETTINGS_ENV, RunSettingsError, pick_run_settings

    name = os.environ.get(RUN_SETTINGS_ENV, AUTO)
    machine = probe_machine(models.device, models.sources())
    try:
        chosen = pick_run_settings(name, machine)
    except RunSettingsError as exc:
        typer.secho(f"✗ run settings: {exc}", fg=typer.colors.RED)
        return
    how = f"auto on {machine.describe()}" if name == AUTO else f"{RUN_SETTINGS_ENV}={name}"
    typer.echo(f"run settings: {chosen.name} ({how}; {RUN_SETTINGS_ENV}): {chosen.title}")


"""Helpers shared by the asset modules: partition context, publishing, lineage run rows."""

from __future__ import annotations

import functools
import inspect
import os
import socket
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from flen_assets.dagster_resources import ProjectResource, RunSettingsResource
from flen_assets.instance import describe_run, run_state, runs_ahead
from flen_assets.launchers import gpu_step_tags
from flen_assets.visuals import Tile, contact_sheet, markdown_thumbnail, save_sheet
from flen_io_managers.partition_folder import PartitionFolder, partition_keys
from flen_resources.evaluation import is_missing, not_available
from flen_resources.gpu_lease import GPU_POOL, step_gpu
from flen_resources.lineage import LineageStore, to_json, utcnow
from flen_resources.project import CONTACT_SHEET, MANIFEST, Project, flen_command, iteration_number
from flen_resources.run_settings import RunSettingsError, fill_knobs, refuse_misfit
from flen_resources.storage import DvcStore, PartitionMissing
from flen_resources.trainers.config import LoraTrainConfig

CODE_VERSION = "0.1.0"

# Output(data_version=...) is marked beta; it is how the DVC md5 becomes the data version.
warnings.filterwarnings("ignore", category=dg.BetaWarning)

ConfigT = TypeVar("ConfigT", bound=dg.Config)


@dataclass
class PartitionRun:
    """Everything an asset body needs about the partition it is materializing."""

    context: dg.AssetExecutionContext
    project: Project
    lineage: LineageStore
    asset: str
    character: str
    iteration: str
    started_at: datetime = field(default_factory=utcnow)
    cross_inputs: list[dict] = field(default_factory=list)  # v(N-1) partitions read (see previous())
    settings: dict[str, Any] = field(default_factory=dict)  # the run settings that sized it (see sized())

    @classmethod
    def start(cls, context: dg.AssetExecutionContext, project: ProjectResource) -> "PartitionRun":
        character, iteration = partition_keys(context)
        return cls(context, project.project, project.lineage, context.asset_key.path[-1], character, iteration)

    @property
    def run_id(self) -> str:
        return self.context.run_id

    @property
    def number(self) -> int:
        return iteration_number(self.iteration)

    def stamp(self, **extra: Any) -> dict[str, Any]:
        """The columns every lineage row of this materialization shares."""
        return {"run_id": self.run_id, "asset": self.asset, "character": self.character,
                "iteration": self.iteration, **extra}

    def sized(self, config: ConfigT, run_settings: RunSettingsResource) -> ConfigT:
        """`config` with its unset sized knobs taken from the run settings; GPU-sized settings on a CPU are refused."""
        try:
            settings, machine = run_settings.pick()
            warning = refuse_misfit(settings, machine)
        except RunSettingsError as exc:
            raise dg.Failure(str(exc)) from exc  # `flen` and the UI name the step and partition
        if warning:
            self.context.log.warning(warning)
        knobs, overruled = fill_knobs(settings, self.asset, config.model_dump())
        how = "auto: " + machine.describe() if run_settings.name != settings.name else "chosen"
        self.settings = {"name": settings.name, "how": how, "knobs": knobs, "overruled": overruled}
        self.context.log.info(f"{self.asset} {self.character}|{self.iteration}: run settings {settings.name} ({how})"
                              + (f", overruled: {overruled}" if overruled else ""))
        return config.model_copy(update=knobs)

    def previous_iteration(self) -> str | None:
        return f"v{self.number - 1}" if self.number > 1 else None

    def previous(self, asset: str) -> PartitionFolder | None:
        """`asset` of v(N-1), read through the lineage store's DVC pointer (None for v1).

        Dagster forbids the cycle vN -> v(N+1) in the asset graph, so these cross-iteration reads
        happen here: they fail fast when v(N-1) is not materialized, and are recorded in lineage
        (the run's params) and in the materialization metadata.
        """
        prev = self.previous_iteration()
        if prev is None:
            return None
        self.refuse_when_previous_unfinished(asset)
        try:
            path, md5 = DvcStore(self.project).published(asset, self.character, prev)
        except PartitionMissing as exc:
            raise dg.Failure(f"{self.asset} {self.character}|{self.iteration} reads {asset} of {prev}: {exc}") from exc
        self.cross_inputs.append({"asset": asset, "iteration": prev, "dvc_md5": md5})
        return PartitionFolder(asset, self.character, prev, path, md5)

    def refuse_when_previous_unfinished(self, asset: str) -> None:
        """Fail fast when a run of an earlier iteration of this character is queued or running: what this
        run would read of v(N-1) is about to change. (The run queue already starts one run per character
        at a time, lowest iteration first, and `flen materialize` waits its turn: this is the backstop.)"""
        if self.context is None:
            return
        ahead = runs_ahead(self.context.instance, self.character, self.number, exclude=self.run_id)
        if ahead:
            run = ahead[-1]
            raise dg.Failure(f"{self.asset} {self.character}|{self.iteration} reads {asset} of "
                             f"{self.previous_iteration()}, but run {run.run_id[:8]} ({describe_run(run)}) is "
                             f"{run_state(run)}: iterations of one character run in order; launch "
                             f"{self.character}|{self.iteration} again once it has finished")


class LoraAssetConfig(dg.Config):
    """The LoRA knobs users tune, shown in the launchpad; other defaults are `flen train flux`'s (LoraTrainConfig's).

    Unset (null) knobs come from the run settings (cpu-demo, 24gb-card, large-card: flen_resources.run_settings).
    The base model, its quantization and the device come from the `models` resource.
    """

    steps: int | None = None  # null: the run settings'
    rank: int | None = None  # null: the run settings'
    learning_rate: float | None = None  # null: the run settings'
    resolution: int | None = None  # bucket area = resolution^2; null: the run settings'
    optimizer: str = LoraTrainConfig.optimizer  # auto: trainers/config.auto_optimizer; or adamw8bit | adamw
    # 0: every 250 steps, or a quarter of a shorter run (checkpoint_interval); null: the run settings'
    checkpoint_every: int | None = None
    seed: int = LoraTrainConfig.seed
    compile: bool = LoraTrainConfig.compile  # torch.compile the transformer blocks on a GPU: ~1.2x faster steps
    attention: str = LoraTrainConfig.attention  # on a GPU: cudnn, flash, or auto (cuDNN on Hopper and newer)

    def knobs(self) -> dict[str, Any]:
        """The knobs as LoraTrainConfig.from_knobs takes them (no previews: the assets publish an evaluation)."""
        return dict(steps=self.steps, rank=self.rank, learning_rate=self.learning_rate, resolution=self.resolution,
                    optimizer=self.optimizer, checkpoint_every=self.checkpoint_every, seed=self.seed,
                    compile=self.compile, attention=self.attention, sample_every=0)


def partition_asset(group: str, **kwargs: Any):
    """@dg.asset for a character x iteration partition whose folder is published with DVC."""
    from flen_assets.partitions import character_iteration

    if kwargs.get("pool") == GPU_POOL:  # on Kubernetes the step's pod asks for a card (flen_assets.launchers)
        kwargs["op_tags"] = {**gpu_step_tags(), **kwargs.get("op_tags", {})}
    asset = dg.asset(partitions_def=character_iteration, group_name=group, io_manager_key="partition_io_manager",
                     code_version=kwargs.pop("code_version", "1"), kinds={"python", "dvc"}, **kwargs)
    if kwargs.get("pool") != GPU_POOL:
        return asset
    return lambda body: asset(on_leased_gpu(body))


def on_leased_gpu(body: Callable[..., Any]) -> Callable[..., Any]:
    """The asset body, run on a card of this host leased for the step (flen_resources.gpu_lease).

    The `gpu` pool limits how many GPU steps run at once; the lease picks which card each one gets,
    and gives it back however the step ends."""
    def label(context: dg.AssetExecutionContext) -> str:
        return f"{context.asset_key.to_user_string()} {context.partition_key} (run {context.run_id[:8]})"

    if inspect.isgeneratorfunction(body):
        @functools.wraps(body)
        def leased_generator(context: dg.AssetExecutionContext, *args: Any, **kw: Any) -> Iterator[Any]:
            with step_gpu(label(context), context.log.info):
                yield from body(context, *args, **kw)
        return leased_generator

    @functools.wraps(body)
    def leased(context: dg.AssetExecutionContext, *args: Any, **kw: Any) -> Any:
        with step_gpu(label(context), context.log.info):
            return body(context, *args, **kw)
    return leased


def partition_check(name: str, asset: str, description: str) -> dg.AssetCheckSpec:
    """A check spec (`check_specs=` of partition_asset) partitioned like its asset, character x iteration.

    Without partitions_def Dagster records the check's evaluation with no partition (AssetCheckResult
    takes the step's partition only when the spec has one): the UI then shows "Partition —" and one
    status for every character and iteration. The @asset_check review gates pass
    partitions_def=character_iteration themselves. (A preview feature in Dagster 1.13: its warning is
    silenced in review/gate.py.)"""
    from flen_assets.partitions import character_iteration

    return dg.AssetCheckSpec(name, asset=asset, description=description, partitions_def=character_iteration)


def write_manifest(rows: Sequence[Mapping[str, Any]], folder: Path, schema: pa.Schema | None = None) -> Path:
    """manifest.parquet of a staged partition folder."""
    table = pa.Table.from_pylist([dict(r) for r in rows], schema=schema) if rows or schema else pa.table({})
    path = folder / MANIFEST
    pq.write_table(table, path)
    return path


def readable_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata as the Dagster UI should show it: a float without a value (NaN, which the UI shows as a
    blank cell) becomes text saying why, e.g. mean_distance -> 'n/a (no face found)'."""
    return {k: dg.MetadataValue.text(not_available(k)) if is_missing(v) else v for k, v in metadata.items()}


def publish(run: PartitionRun, project: ProjectResource, staged: Path, *, params: Mapping[str, Any],
            models: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None,
            sheet: list[Tile] | None = None, sheet_columns: int = 6) -> dg.Output:
    """Publish a staged folder with DVC, record the run and artifact in lineage, return the Output."""
    meta: dict[str, Any] = readable_metadata(metadata or {})
    if sheet:
        img = contact_sheet(sheet, columns=sheet_columns)
        save_sheet(img, staged / CONTACT_SHEET)
        meta["contact_sheet"] = dg.MetadataValue.md(markdown_thumbnail(img))
    if run.settings:
        params = {**params, "run_settings": run.settings}
        meta["run_settings"] = run.settings["name"] + (" + overrides" if run.settings["overruled"] else "")
        meta["run_settings_detail"] = dg.MetadataValue.json(run.settings)
    if run.cross_inputs:
        params = {**params, "previous_iteration_inputs": run.cross_inputs}
        meta["previous_iteration_inputs"] = dg.MetadataValue.json(run.cross_inputs)
    # The lineage rows are written inside the publish: when one fails, the DVC version is rolled back
    # too, and the files written so far are removed, so lineage never names a version DVC lacks.
    with project.dvc.publishing(staged, run.asset, run.character, run.iteration) as published:
        now = utcnow()
        written: list[Path] = []
        try:
            written.append(run.lineage.append("artifacts", [run.stamp(
                path=run.project.relative(published.path), dvc_md5=published.dvc_md5, n_files=published.n_files,
                size_bytes=published.size_bytes, dvc_file=published.dvc_file, created_at=now)]))
            written.append(run.lineage.append("runs", [run.stamp(
                code_version=CODE_VERSION, params=to_json(params), models=to_json(models or {}), status="success",
                started_at=run.started_at, finished_at=now, host_pid=f"{socket.gethostname()}:{os.getpid()}")]))
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
    if sheet:
        meta["contact_sheet_path"] = dg.MetadataValue.path(str(published.path / CONTACT_SHEET))
    meta.update({
        "dvc_md5": published.dvc_md5,
        "path": dg.MetadataValue.path(str(published.path)),
        "files": published.n_files,
        "size_mb": round(published.size_bytes / 1e6, 2),
        "lineage": dg.MetadataValue.md(f"`{flen_command(run.project, 'lineage', run.character, run.iteration)}`"),
    })
    folder = PartitionFolder(run.asset, run.character, run.iteration, published.path, published.dvc_md5)
    return dg.Output(folder, data_version=dg.DataVersion(published.dvc_md5), metadata=meta)

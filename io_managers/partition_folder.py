"""IO manager for DVC-versioned partition folders under data/<asset>/<character>/<iteration>/.

Assets publish their folder themselves (through ProjectResource.dvc) so the DVC md5 can be the
materialization's data version; this IO manager hands downstream assets the published folder
and its manifest, restoring it from the DVC cache when the workspace copy is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from flen_resources.project import MANIFEST, Project, split_partition_key
from flen_resources.storage import DvcStore


@dataclass(frozen=True)
class PartitionFolder:
    """A published partition: its folder, its DVC md5 and its manifest table."""

    asset: str
    character: str
    iteration: str
    path: Path
    dvc_md5: str

    @property
    def manifest(self) -> pa.Table:
        return pq.read_table(self.path / MANIFEST)

    def rows(self) -> list[dict]:
        return self.manifest.to_pylist()


def partition_keys(context: dg.InputContext | dg.OutputContext | dg.AssetExecutionContext) -> tuple[str, str]:
    """(character, iteration) of the current partition."""
    key = context.partition_key
    if isinstance(key, dg.MultiPartitionKey):
        dims = key.keys_by_dimension
        return dims["character"], dims["iteration"]
    return split_partition_key(key)  # a plain 'alice|v1' string


class PartitionFolderIOManager(dg.ConfigurableIOManager):
    """Loads upstream partition folders; outputs are already published by the asset."""

    project_dir: str = ""

    def _project(self) -> Project:
        return Project(Path(self.project_dir).resolve()) if self.project_dir else Project.discover()

    def handle_output(self, context: dg.OutputContext, obj: PartitionFolder) -> None:
        if not isinstance(obj, PartitionFolder):
            raise TypeError(f"{context.asset_key.to_user_string()} must return a PartitionFolder, got {type(obj).__name__}")
        if not (obj.path / MANIFEST).is_file():
            raise FileNotFoundError(f"{obj.path / MANIFEST} is missing: the partition was not published")

    def load_input(self, context: dg.InputContext) -> PartitionFolder:
        asset = context.asset_key.path[-1]
        character, iteration = partition_keys(context)
        path, md5 = DvcStore(self._project()).published(asset, character, iteration)
        return PartitionFolder(asset, character, iteration, path, md5)

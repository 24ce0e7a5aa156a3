"""Where a FLENwheel project keeps its files, and the rules for names that become paths."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

# A slug: lower-case letters, digits, '-' and '_', starting with a letter or digit. This excludes
# Dagster's multi-partition separators (| , [ ]), path separators and '..' by construction.
SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")  # \Z: `$` would let a trailing newline in
ITERATION_RE = re.compile(r"^v([1-9][0-9]{0,3})\Z")
PROJECT_ENV = "FLEN_PROJECT_DIR"
MANIFEST = "manifest.parquet"  # every partition folder's table of what it holds
CONTACT_SHEET = "contact_sheet.png"  # the partition's images at a glance (most assets)
LOSS_CURVE = "loss_curve.png"  # flux_lora, qwen_adapter
EVAL_HISTORY = "history.png"  # lora_eval: the metrics of v1..vN as a plot
EVAL_METRICS = "metrics.json"  # lora_eval: identity consistency, face-detected rate, mean distance, diversity
EVAL_EVOLUTION = "evolution.png"  # lora_eval: the same prompts and seeds of v1..vN as a grid
EVAL_BY_STEP = "identity_by_step.png"  # lora_eval: every checkpoint's identity scores against its step
EVAL_CHECKPOINT_GRID = "checkpoint_grid.png"  # lora_eval: checkpoints x prompts
# flux_lora and lora_eval: the checkpoints kept for evaluation (steps, files) and their scores.
CHECKPOINTS_FILE = "checkpoints.json"
CHECKPOINT_DIR = "checkpoints"
# The LoRA files users load: diffusers keys, and the same weights with ComfyUI keys. Their names
# are part of the published data (DVC hashes, exports, ComfyUI workflows): never rename them.
FLUX_LORA_FILE = "lora.safetensors"
FLUX_LORA_COMFYUI_FILE = "lora_comfyui.safetensors"
QWEN_ADAPTER_FILE = "qwen_adapter.safetensors"
QWEN_ADAPTER_COMFYUI_FILE = "qwen_adapter_comfyui.safetensors"


class InvalidNameError(ValueError):
    """A user-supplied name that cannot be used as a partition key or a folder name."""


def validate_slug(name: str, what: str = "character name") -> str:
    """Return `name` if it is a safe slug, else raise InvalidNameError saying why."""
    if not isinstance(name, str) or not SLUG_RE.match(name):
        raise InvalidNameError(
            f"invalid {what} {name!r}: use 1-64 lower-case letters, digits, '-' or '_', "
            "starting with a letter or digit (no '/', '..', spaces or any of | , [ ])"
        )
    return name


def validate_iteration(name: str) -> str:
    """Return `name` if it looks like v1, v2, ... else raise InvalidNameError."""
    if not isinstance(name, str) or not ITERATION_RE.match(name):
        raise InvalidNameError(f"invalid iteration {name!r}: expected v1, v2, v3, ...")
    return name


def iteration_number(iteration: str) -> int:
    """'v3' -> 3."""
    return int(validate_iteration(iteration)[1:])


def split_partition_key(key: str) -> tuple[str, str]:
    """'alice|v1' (a character x iteration key as Dagster prints it) -> ('alice', 'v1'), validated."""
    character, sep, iteration = key.partition("|")
    if not sep:
        raise InvalidNameError(f"invalid partition key {key!r}: expected CHARACTER|ITERATION, e.g. alice|v1")
    return validate_slug(character), validate_iteration(iteration)


def did_you_mean(name: str, known: list[str] | set[str], listing: str = "known") -> str:
    """' (did you mean alice?)' for the known names closest to a mistyped one; else ' (known: a, b)'
    (`listing` names the list), or '' when nothing is known."""
    import difflib

    names = sorted(set(known))
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if close:
        return f" (did you mean {' or '.join(close)}?)"
    if names:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        return f" ({listing}: {shown})"
    return ""


def find_project_root(start: Path | None = None) -> Path:
    """The project root: $FLEN_PROJECT_DIR, else the nearest folder up from `start` holding workspace.yaml."""
    env = os.environ.get(PROJECT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "workspace.yaml").is_file() and (folder / "pyproject.toml").is_file():
            return folder
    return here


@dataclass(frozen=True)
class Project:
    """The folders of one project: data (DVC-tracked), inbox, and local state (.flen/)."""

    root: Path

    @classmethod
    def discover(cls, start: Path | None = None) -> "Project":
        return cls(find_project_root(start))

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def inbox_dir(self) -> Path:
        return self.root / "inbox"

    @property
    def state_dir(self) -> Path:
        return self.root / ".flen"

    @property
    def dagster_home(self) -> Path:
        return self.state_dir / "dagster"

    @property
    def lineage_dir(self) -> Path:
        return self.state_dir / "lineage"

    @property
    def staging_dir(self) -> Path:
        return self.state_dir / "staging"

    @property
    def locks_dir(self) -> Path:
        return self.state_dir / "locks"

    @property
    def dvc_remote_dir(self) -> Path:
        return self.state_dir / "dvc-remote"

    def partition_dir(self, asset: str, character: str, iteration: str) -> Path:
        """data/<asset>/<character>/<iteration>, refusing anything that would leave data/."""
        validate_slug(asset, "asset name")
        validate_slug(character)
        validate_iteration(iteration)
        path = (self.data_dir / asset / character / iteration).resolve()
        if not path.is_relative_to(self.data_dir.resolve()):
            raise InvalidNameError(f"{path} is outside the data folder {self.data_dir}")
        return path

    def inbox_for(self, character: str) -> Path:
        """inbox/<character>, validated."""
        return self.inbox_dir / validate_slug(character)

    def relative(self, path: Path) -> str:
        """A path as stored in lineage: relative to the project root, POSIX style."""
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def latest_iteration(self, character: str, asset: str = "synthetic_batch") -> int:
        """The highest N whose `asset` partition is published for `character` (0 when none)."""
        folder = self.data_dir / validate_slug(asset, "asset name") / validate_slug(character)
        numbers = [int(p.name[1:-4]) for p in folder.glob("v*.dvc") if ITERATION_RE.match(p.name[:-4])]
        return max(numbers, default=0)


def flen_command(project: "Project | Path | str", *args: object) -> str:
    """A `flen` command line to print for a person: `flen ARGS... --project ROOT`, each part shell-quoted.

    Every command FLENwheel prints (asset metadata, check descriptions, run logs, the review page,
    CLI hints) is built here: it names the project folder, so pasted into a shell in any folder (or
    from the Dagster UI) it acts on this project. `--project` is an option of each subcommand, not
    of `flen` itself, so it goes after the subcommand and its arguments."""
    root = project.root if isinstance(project, Project) else Path(project)
    return " ".join(["flen", *(shlex.quote(str(a)) for a in args), "--project", shlex.quote(str(root))])

"""Partitions: character (dynamic) x iteration (dynamic: v1, v2, ...): registering them, the rule for
which may be registered (a known character, iterations in order), and removing them."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from flen_resources.archive import ARCHIVE_DIR
from flen_resources.project import (
    SLUG_RE,
    Project,
    did_you_mean,
    flen_command,
    iteration_number,
    validate_iteration,
    validate_slug,
)

character_partitions = dg.DynamicPartitionsDefinition(name="character")
iteration_partitions = dg.DynamicPartitionsDefinition(name="iteration")

character_iteration = dg.MultiPartitionsDefinition(
    {"character": character_partitions, "iteration": iteration_partitions}
)


def partition_key(character: str, iteration: str) -> dg.MultiPartitionKey:
    """The validated multi-partition key for (character, iteration); prints as 'alice|v1'."""
    return dg.MultiPartitionKey({"character": validate_slug(character), "iteration": validate_iteration(iteration)})


def add_partitions(instance: dg.DagsterInstance, character: str, iteration: str = "v1") -> dg.MultiPartitionKey:
    """Register a character and an iteration with the instance (idempotent)."""
    key = partition_key(character, iteration)
    _add_dynamic_partition(instance, character_partitions.name, character)
    _add_dynamic_partition(instance, iteration_partitions.name, iteration)
    return key


def _add_dynamic_partition(instance: dg.DagsterInstance, name: str, key: str) -> None:
    """Add one key unless present; safe when other processes (two `flen materialize`) add it too."""
    if instance.has_dynamic_partition(name, key):
        return
    try:
        instance.add_dynamic_partitions(name, [key])
    except Exception:
        # Check-then-insert is not atomic: another process may have inserted the key in between,
        # and the storage's unique index refuses the second insert. That is success for us.
        if not instance.has_dynamic_partition(name, key):
            raise


# -- which partitions may exist: a known character, iterations in order ------------------------------

class PartitionRefused(ValueError):
    """A partition that must not be registered, or removed now; the message names the cause and the fix."""


def registered_characters(instance: dg.DagsterInstance) -> list[str]:
    return list(instance.get_dynamic_partitions(character_partitions.name))


def known_characters(project: Project, instance: dg.DagsterInstance | None = None) -> list[str]:
    """Characters a command may name: registered, or with photos in inbox/<name>/, or with published data,
    or with a run queued or running."""
    from flen_resources.archive import characters_with_data

    known = set()
    if instance is not None:
        known |= set(registered_characters(instance))
        known |= {r.tags["dagster/partition"].split("|")[0] for r in _live_runs(instance, None, None)}
    inbox = project.inbox_dir
    for folder in inbox.iterdir() if inbox.is_dir() else []:
        if folder.is_dir() and not folder.name.startswith(".") and SLUG_RE.match(folder.name) \
                and any(f.is_file() and not f.name.startswith(".") for f in folder.iterdir()):
            known.add(folder.name)
    return sorted(known | set(characters_with_data(project)))


def unknown_character_message(project: Project, character: str, known: list[str]) -> str:
    return (f"unknown character {character!r}{did_you_mean(character, known)}: it has no photos in "
            f"{project.inbox_for(character)} and is not registered; check the name, or add its photos with "
            f"`{flen_command(project, 'character', 'add', character, '--from', 'DIR')}`")


def check_new_partition(project: Project, instance: dg.DagsterInstance, character: str, iteration: str) -> None:
    """Refuse, before anything is registered, a partition of an unknown character or one that skips an
    iteration: vN (N > 1) needs v(N-1) complete, its synthetic_batch published (what `flen iterate`
    and the next-iteration sensor wait for; training_set vN reads it)."""
    validate_slug(character)
    known = known_characters(project, instance)
    if character not in known:
        raise PartitionRefused(unknown_character_message(project, character, known))
    check_iteration_order(project, character, iteration, instance)


def check_iteration_order(project: Project, character: str, iteration: str,
                          instance: dg.DagsterInstance | None = None) -> None:
    """Refuse vN (N > 1) of `character` unless v(N-1) is complete (its synthetic_batch published) or, with
    `instance`, a run of v(N-1) is queued or running (vN then waits its turn: runs.wait_for_turn)."""
    number = iteration_number(iteration)
    previous = f"v{number - 1}"
    if number > 1 and not (project.data_dir / "synthetic_batch" / character / f"{previous}.dvc").is_file() \
            and not (instance is not None and _live_runs(instance, character, previous)):
        nxt = f"v{project.latest_iteration(character) + 1}"
        raise PartitionRefused(
            f"{character}|{iteration} would skip an iteration: {character}|v{number - 1} is not complete (its "
            f"synthetic_batch is not published); did you mean {nxt}? Complete it with "
            f"`{flen_command(project, 'materialize', character, nxt, '--all')}`, then "
            f"`{flen_command(project, 'iterate', character)}` runs the next one")


# -- removing partitions ---------------------------------------------------------------------------

_LIVE = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING")


def _live_runs(instance: dg.DagsterInstance, character: str | None, iteration: str | None) -> list:
    """Runs of `character` (of `iteration`; of any character when None) that are queued or running."""
    from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter

    runs = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus[s] for s in _LIVE]))
    found = []
    for run in runs:
        who, sep, which = (run.tags.get("dagster/partition") or "").partition("|")
        if sep and (character is None or who == character) and (iteration is None or which == iteration):
            found.append(run)
    return found


def _wipe(instance: dg.DagsterInstance, keys: list[str]) -> None:
    """Forget the materializations of these partitions (their data is archived): a partition registered
    again later shows as missing, not as the archived version."""
    from flen_assets.definitions import defs

    for asset_key in defs.resolve_asset_graph().get_all_asset_keys():
        try:
            instance.wipe_asset_partitions(asset_key, keys)
        except NotImplementedError:  # a storage without partition wipes: the event log keeps them
            return


def wipe_partitions(instance: dg.DagsterInstance, partitions: list[tuple[str, str, str]]) -> bool:
    """Forget the materializations of these (asset, character, iteration) partitions (`flen forget` removed
    their data), so the UI shows them missing. A storage without partition wipes (SQLite) keeps them: each
    gets an observation saying its data was erased and must be materialized again; returns False then."""
    wiped = True
    for asset, character, iteration in partitions:
        key = str(partition_key(character, iteration))
        try:
            instance.wipe_asset_partitions(dg.AssetKey(asset), [key])
        except NotImplementedError:
            wiped = False
            instance.report_runless_asset_event(dg.AssetObservation(
                asset_key=asset, partition=key, description="erased by flen forget: materialize it again",
                metadata={"erased": True, "materialize": flen_command_text(asset, character, iteration)}))
    return wiped


def flen_command_text(asset: str, character: str, iteration: str) -> str:
    return f"flen materialize {character} {iteration} --all" if asset != "training_set" else \
        f"flen materialize {character} {iteration}"


def remove_character(project: Project, instance: dg.DagsterInstance, character: str,
                     archive: bool = False) -> tuple[list[Path], Path | None]:
    """Delete the character partition key (every `character|vN`): refused while it has data (partition
    folders, pointers, inbox photos, reports) unless `archive`, which moves them to archive/ first.
    Returns (what was archived, the archive folder)."""
    from flen_resources.archive import character_paths

    validate_slug(character)
    known = known_characters(project, instance)
    if character not in known:
        raise PartitionRefused(f"unknown character {character!r}{did_you_mean(character, known)}: "
                               "nothing to remove; `flen character list` shows the registered ones")
    live = _live_runs(instance, character, None)
    if live:
        raise PartitionRefused(f"run {live[0].run_id[:8]} of {live[0].tags.get('dagster/partition')} is "
                               f"{live[0].status.value.lower()}: wait for it to end (or stop it), then remove {character}")
    paths = character_paths(project, character)
    where = None
    if paths and not archive:
        raise PartitionRefused(f"{character} has data ({_summary(project, paths)}): add --archive to move it to "
                               f"{ARCHIVE_DIR}/ (kept, never deleted) and remove the character")
    if paths:
        where = _archive(project, paths, character)
    iterations = instance.get_dynamic_partitions(iteration_partitions.name)
    _wipe(instance, [str(partition_key(character, it)) for it in iterations])
    instance.delete_dynamic_partition(character_partitions.name, character)
    return paths, where


def remove_iteration(project: Project, instance: dg.DagsterInstance, character: str, iteration: str,
                     archive: bool = False) -> tuple[list[Path], Path | None, bool]:
    """Remove `character|iteration`: refused while it has data unless `archive` (moved to archive/), and
    for any but the character's last iteration. The `iteration` key itself is shared by every character:
    it is deleted only when no other character has data in it. Returns (archived, archive folder,
    whether the iteration key was deleted)."""
    from flen_resources.archive import characters_with_data, iteration_paths, iterations_with_data

    validate_slug(character)
    validate_iteration(iteration)
    known = known_characters(project, instance)
    if character not in known:
        raise PartitionRefused(f"unknown character {character!r}{did_you_mean(character, known)}: "
                               "nothing to remove; `flen character list` shows the registered ones")
    has = iterations_with_data(project, character)
    registered = list(instance.get_dynamic_partitions(iteration_partitions.name))
    if iteration not in has and iteration not in registered:
        raise PartitionRefused(f"{character} has no iteration {iteration}{did_you_mean(iteration, has, 'it has')}")
    later = [it for it in has if iteration_number(it) > iteration_number(iteration)]
    if later:
        raise PartitionRefused(f"{character}|{iteration} is not {character}'s last iteration ({', '.join(later)} "
                               f"build on it): remove {later[-1]} first")
    live = _live_runs(instance, character, iteration)
    if live:
        raise PartitionRefused(f"run {live[0].run_id[:8]} of {character}|{iteration} is "
                               f"{live[0].status.value.lower()}: wait for it to end (or stop it), then remove it")
    paths = iteration_paths(project, character, iteration)
    if paths and not archive:
        raise PartitionRefused(f"{character}|{iteration} has data ({_summary(project, paths)}): add --archive to "
                               f"move it to {ARCHIVE_DIR}/ (kept, never deleted) and remove the partition")
    where = _archive(project, paths, f"{character}-{iteration}") if paths else None
    _wipe(instance, [str(partition_key(character, iteration))])
    others = [c for c in characters_with_data(project, iteration) if c != character]
    deleted = not others
    if deleted:
        instance.delete_dynamic_partition(iteration_partitions.name, iteration)
    return paths, where, deleted


def _summary(project: Project, paths: list[Path]) -> str:
    shown = [project.relative(p) for p in paths if not p.name.endswith(".dvc")]
    return ", ".join(shown[:4]) + (f" and {len(shown) - 4} more" if len(shown) > 4 else "")


def _archive(project: Project, paths: list[Path], label: str) -> Path:
    from flen_resources.archive import move_to_archive
    from flen_resources.storage import DvcStore

    with DvcStore(project)._lock:  # no publish swaps a folder while it moves
        return move_to_archive(project, paths, label)

"""Partitions: character (dynamic) x iteration (dynamic: v1, v2, ...)."""

from __future__ import annotations

import dagster as dg

from flen_resources.project import validate_iteration, validate_slug

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

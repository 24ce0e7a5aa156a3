"""Exporting one iteration of a character: the training folder ai-toolkit and kohya read (images +
same-name captions), the LoRA files, a Hugging Face model card and a dataset card.

The cards are built with huggingface_hub's ModelCard / DatasetCard, so `ModelCard.load` reads them
back and the Hub shows their metadata. Everything is written into a temporary sibling folder first
and renamed into place: an export is whole or absent.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from flen_resources.checkpoint_selection import PromotedLora, evaluated_scores, promoted_lora
from flen_resources.datasets import trigger_word
from flen_resources.evaluation import TABLE_ROWS, format_metric
from flen_resources.lineage import LineageStore
from flen_resources.project import (
    EVAL_METRICS,
    FLUX_LORA_COMFYUI_FILE,
    FLUX_LORA_FILE,
    LOSS_CURVE,
    MANIFEST,
    Project,
    flen_command,
)
from flen_resources.storage import DvcStore

CARD = "README.md"  # what the Hub reads as a repository's card
LORA_FILES = (FLUX_LORA_FILE, FLUX_LORA_COMFYUI_FILE, LOSS_CURVE)
# FLUX.1-dev's licence: a LoRA trained on it is bound by it.
FLUX_LICENSE = {"license": "other", "license_name": "flux-1-dev-non-commercial-license",
                "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"}
FLUX_HUB_ID = "black-forest-labs/FLUX.1-dev"
ORIGINS = ("source", "enriched", "synthetic")  # where a training image came from (training_set's `origin`)


class ExportError(ValueError):
    """An export that cannot be made; the message names the partition or folder and the fix."""


@dataclass(frozen=True)
class Exported:
    """What an export wrote."""

    folder: Path
    images: int
    lora_files: list[str]
    model_card: Path | None
    dataset_card: Path


def export_iteration(project: Project, character: str, iteration: str, dest: Path) -> Exported:
    """Write `dest`: dataset/ (images, captions, dataset card), the LoRA files and the model card."""
    training = project.partition_dir("training_set", character, iteration)
    if not (training / MANIFEST).is_file():
        raise ExportError(f"training_set {character}|{iteration} is not materialized: run "
                          f"`{flen_command(project, 'materialize', character, iteration)}` first")
    dest = dest.resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest} exists and is not empty: choose a new --to folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        exported = _write(project, character, iteration, training, staging)
        if dest.exists():
            dest.rmdir()  # empty: checked above
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Exported(dest, exported.images, exported.lora_files,
                    dest / CARD if exported.model_card else None, dest / "dataset" / CARD)


def _write(project: Project, character: str, iteration: str, training: Path, out: Path) -> Exported:
    rows = pq.read_table(training / MANIFEST).to_pylist()
    images = out / "dataset"
    images.mkdir()
    for item in sorted((training / "images").iterdir()):
        shutil.copyfile(item, images / item.name)
    facts = IterationFacts.read(project, character, iteration, rows)
    dataset_card(facts).save(images / CARD)
    copied = []
    if facts.promoted is not None:  # the promoted checkpoint's files, under the names users load
        lora = project.partition_dir("flux_lora", character, iteration)
        sources = {FLUX_LORA_FILE: facts.promoted.file, FLUX_LORA_COMFYUI_FILE: facts.promoted.comfyui_file,
                   LOSS_CURVE: lora / LOSS_CURVE}
        for name in LORA_FILES:
            if sources[name].is_file():
                shutil.copyfile(sources[name], out / f"{character}_{iteration}_{name}")
                copied.append(f"{character}_{iteration}_{name}")
    model = None
    if facts.lora:
        model = out / CARD
        model_card(facts, f"{character}_{iteration}_{FLUX_LORA_FILE}").save(model)
    return Exported(out, len(rows), copied, model, images / CARD)


@dataclass(frozen=True)
class IterationFacts:
    """What the cards say about one iteration, read from its published partitions."""

    character: str
    iteration: str
    trigger_word: str
    training_set_md5: str
    origins: dict[str, int]  # ORIGINS -> images in the training set
    captions: dict[str, str]  # one example caption per origin
    lora: dict[str, Any]  # flux_lora's manifest row of the diffusers file ({} when not trained)
    scores: dict[str, Any]  # the promoted checkpoint's scores, else lora_eval's metrics ({} when not evaluated)
    promoted: PromotedLora | None  # the LoRA files the export holds (None when not trained)

    @classmethod
    def read(cls, project: Project, character: str, iteration: str, rows: list[dict]) -> IterationFacts:
        counts = Counter(r["origin"] for r in rows)
        origins = {origin: counts.get(origin, 0) for origin in ORIGINS}
        captions = {r["origin"]: r["caption"] for r in reversed(rows)}
        lora_manifest = project.partition_dir("flux_lora", character, iteration) / MANIFEST
        lora = next((r for r in pq.read_table(lora_manifest).to_pylist() if r.get("key_style") == "diffusers"), {}) \
            if lora_manifest.is_file() else {}
        metrics = project.partition_dir("lora_eval", character, iteration) / EVAL_METRICS
        scores = json.loads(metrics.read_text()) if metrics.is_file() else {}
        store = DvcStore(project)
        md5 = store.published("training_set", character, iteration)[1]
        trigger = trigger_word(rows, character)
        promoted = None
        if lora:
            lineage = LineageStore(project.lineage_dir)
            lora_md5 = store.published("flux_lora", character, iteration)[1]
            promoted = promoted_lora(lineage, lora_manifest.parent, character, iteration, lora_md5, FLUX_LORA_FILE,
                                     FLUX_LORA_COMFYUI_FILE)
            evaluated = [s for s in evaluated_scores(lineage, character, iteration, lora_md5) if s.step == promoted.step]
            if evaluated:  # a person's promotion after the evaluation: that checkpoint's own scores
                scores = {**scores, "identity_consistency": evaluated[0].identity_pass_rate,
                          **{k: v for k, v in evaluated[0].as_dict().items() if k not in ("step", "images")}}
        return cls(character, iteration, trigger, md5, origins, captions, lora, scores, promoted)


def _finite(value: Any) -> Any:
    """None for NaN (YAML and JSON readers disagree on NaN); the value otherwise."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def model_card(facts: IterationFacts, lora_file: str):
    """The model card of the FLUX LoRA: base model and revision, trigger word, settings, data, scores, lineage."""
    from huggingface_hub import ModelCard, ModelCardData

    config = json.loads(facts.lora.get("config") or "{}")
    base = facts.lora.get("base_model") or ""
    base_id, _, revision = base.partition("@")
    settings = {k: config[k] for k in ("max_steps", "rank", "alpha", "learning_rate", "resolution", "optimizer",
                                       "quantization", "seed") if k in config}
    scores = {k: _finite(v) for k, v in facts.scores.items()}
    checkpoint_step = facts.promoted.step if facts.promoted and facts.promoted.step else facts.lora.get("steps")
    chosen_by = facts.promoted.describe() if facts.promoted else "the final step"
    data = ModelCardData(
        base_model=base_id if base_id and not base_id.startswith("tiny/") else None,
        library_name="diffusers", pipeline_tag="text-to-image", **FLUX_LICENSE,
        tags=["flux", "lora", "text-to-image", "diffusers", "flenwheel", "template:sd-lora"],
        instance_prompt=facts.trigger_word,
        base_model_ref=base, base_model_revision=revision or None,
        training_set_md5=facts.training_set_md5,
        training_settings=settings,
        checkpoint={"step": checkpoint_step, "chosen_by": chosen_by},
        evaluation=scores,
        lineage={"character": facts.character, "iteration": facts.iteration, **facts.origins},
    )
    text = f"""---
{data.to_yaml()}
---

# {facts.character} {facts.iteration}: a FLUX.1-dev LoRA made with FLENwheel

Trigger word: **`{facts.trigger_word}`**, e.g. `photo of {facts.trigger_word}, portrait, looking at the camera`.

```python
import torch
from diffusers import FluxPipeline

pipe = FluxPipeline.from_pretrained("{FLUX_HUB_ID}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights(".", weight_name="{lora_file}")
image = pipe("photo of {facts.trigger_word}, portrait", num_inference_steps=28).images[0]
```

`{facts.character}_{facts.iteration}_{FLUX_LORA_COMFYUI_FILE}` holds the same weights with ComfyUI's keys.

## Base model
`{base or 'unknown'}` (revision `{revision or 'unknown'}`).

## Training
| setting | value |
|---|---|
""" + "".join(f"| {k} | {v} |\n" for k, v in settings.items()) + f"""
Checkpoint: step {checkpoint_step} of {facts.lora.get('steps')} ({chosen_by}; FLENwheel scores every kept checkpoint
on fixed prompts and seeds and promotes the best, see `flen eval {facts.character} {facts.iteration}`).

## Training data
{sum(facts.origins.values())} images, training set md5 `{facts.training_set_md5}`:
""" + "".join(f"- {n} {origin}\n" for origin, n in facts.origins.items()) + """
## Evaluation (FLENwheel's fixed prompts and seeds)
| metric | value |
|---|---|
""" + "".join(f"| {label} | {format_metric(key, scores.get(key))} |\n" for key, label in TABLE_ROWS) + f"""
Lineage: `flen lineage {facts.character} {facts.iteration}` traces every training image to its source photo.
"""
    return ModelCard(text)


def dataset_card(facts: IterationFacts):
    """The dataset card of the training folder: what it holds, where each image came from, its md5."""
    from huggingface_hub import DatasetCard, DatasetCardData

    total = sum(facts.origins.values())
    data = DatasetCardData(
        pretty_name=f"{facts.character} {facts.iteration} training set", task_categories=["text-to-image"],
        size_categories=["n<1K"] if total < 1000 else ["1K<n<10K"], tags=["flenwheel", "lora", "captioned-images"],
        character=facts.character, iteration=facts.iteration, trigger_word=facts.trigger_word,
        training_set_md5=facts.training_set_md5, origins=facts.origins,
    )
    text = f"""---
{data.to_yaml()}
---

# {facts.character} {facts.iteration}: training set

{total} images, each with a same-name `.txt` caption (the layout ai-toolkit and kohya read). Trigger
word `{facts.trigger_word}`; training set md5 `{facts.training_set_md5}`.

| origin | images | example caption |
|---|---|---|
""" + "".join(f"| {o} | {n} | {facts.captions.get(o, '')} |\n" for o, n in facts.origins.items()) + f"""
- source: the character's own photos that passed intake and the identity gate;
- enriched: edits of those photos (new angles, light, backgrounds) that passed the gates and review;
- synthetic: images generated by the previous iteration's LoRA and accepted in review.

Lineage: `flen lineage {facts.character} {facts.iteration}` in the project that made it.
"""
    return DatasetCard(text)

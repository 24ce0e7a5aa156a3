"""Dagster resources: the typed, configurable handles assets use for storage, faces and editing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import PrivateAttr

from flen_resources.bucket import Bucket, cluster_bucket
from flen_resources.deployment import DeploymentError
from flen_resources.editors import Editor, get_editor
from flen_resources.faces import FaceAnalyzer
from flen_resources.lineage import LineageStore
from flen_resources.models.registry import DEFAULT_EDIT_MODEL
from flen_resources.models.residency import DEFAULT_MEMORY_BUDGET_GIB
from flen_resources.project import Project
from flen_resources.run_settings import AUTO, Machine, RunSettings, pick_run_settings
from flen_resources.storage import DvcStore
from flen_resources.trainers.config import LoraTrainConfig


class ProjectResource(dg.ConfigurableResource):
    """The project folder: DVC-versioned data, lineage store and staging area."""

    project_dir: str = ""  # empty: $FLEN_PROJECT_DIR or the folder holding workspace.yaml

    @property
    def project(self) -> Project:
        return Project(Path(self.project_dir).resolve()) if self.project_dir else Project.discover()

    @property
    def lineage(self) -> LineageStore:
        return LineageStore(self.project.lineage_dir)

    @property
    def dvc(self) -> DvcStore:
        return DvcStore(self.project)

    @property
    def bucket(self) -> Bucket | None:
        """The cluster deployment's bucket (None in `local`)."""
        return cluster_bucket()


class FaceResource(dg.ConfigurableResource):
    """face_recognition settings: `hog` on CPU, `cnn` with a CUDA build of dlib."""

    model: Literal["hog", "cnn"] = "hog"
    upsample: int = 1
    num_jitters: int = 1
    max_side: int = 1024
    _analyzer: FaceAnalyzer | None = PrivateAttr(default=None)

    @property
    def analyzer(self) -> FaceAnalyzer:
        if self._analyzer is None:
            self._analyzer = FaceAnalyzer(self.model, self.upsample, self.num_jitters, self.max_side)
        return self._analyzer


# The ModelsResource field that holds each registered model's source (registry.MODELS keys).
MODEL_FIELDS = {"qwen-image-edit-2509": "qwen_edit_model", "qwen-image-edit-2511": "qwen_edit_2511_model",
                "flux.1-dev": "flux_model"}


class ModelsResource(dg.ConfigurableResource):
    """The one source of model settings: which models the editor, the generator and both trainers
    load, how their base weights are quantized, and on which device.

    Sources: a hub id (`org/name`), a local folder, or the embedded tiny pack (`tiny`, the
    default). definitions.py reads each field from its FLEN_* variable with dg.EnvVar when set.
    """

    flux_model: str = "tiny"  # FLUX.1-dev: the generator and the FLUX LoRA trainer
    # Qwen-Image-Edit-2509 and -2511: the editor and the edit-model trainer (a recipe's edit_model picks one)
    qwen_edit_model: str = "tiny"
    qwen_edit_2511_model: str = "tiny"
    # auto | none | nf4 (| fp8, the trainers and the generator); auto: nf4 on a CUDA GPU, none on the CPU, and for
    # the trainers and the generator fp8 on an Ada/Hopper card when the model fits memory_budget_gib in fp8 (the
    # Qwen-Image-Edit trainer with blocks swapped from host memory) and the host holds it in bf16 while it quantizes
    # (models.quantization, which also refuses other values: a str, not a Literal, so that dg.EnvVar can fill it)
    quantization: str = "auto"
    device: str = "auto"  # auto: the CUDA GPU when there is one
    # card memory the editor may keep its components resident in (models.residency; 0: one at a time), and the
    # bound for the trainers' and the generator's fp8 choice
    memory_budget_gib: int = DEFAULT_MEMORY_BUDGET_GIB

    def read_now(self) -> ModelsResource:
        """This resource with its dg.EnvVar fields read from the environment now (for commands outside a run)."""
        def now(name: str, value):  # dg.EnvVar, or the int-typed one dg.EnvVar.int gives
            if not hasattr(value, "get_value"):
                return value
            try:
                return value.get_value()
            except ValueError:  # int('abc'): said as the setting, not as Python's conversion
                raise DeploymentError(f"{value.env_var_name}={os.environ.get(value.env_var_name)!r} is not a whole "
                                      f"number ({name}): set it to one, e.g. {value.env_var_name}="
                                      f"{type(self).model_fields[name].default}, or unset it") from None

        return ModelsResource(**{name: now(name, getattr(self, name)) for name in type(self).model_fields})

    def source(self, model: str) -> str:
        """The source of the registered model `model` (e.g. qwen-image-edit-2511)."""
        return getattr(self, MODEL_FIELDS[model])

    def sources(self) -> list[str]:
        """Every model's source."""
        return [self.source(model) for model in MODEL_FIELDS]


class RunSettingsResource(dg.ConfigurableResource):
    """Which named run settings size the work (flen_resources.run_settings): auto | cpu-demo | 24gb-card | large-card.

    `auto` picks from the machine: cpu-demo on a CPU or with the tiny pack, else by the card's memory.
    definitions.py reads `name` from FLEN_RUN_SETTINGS with dg.EnvVar when set; the flywheel_* jobs set it.
    """

    models: ModelsResource
    name: str = AUTO

    def machine(self) -> Machine:
        """The device the models run on, probed now (imports torch)."""
        from flen_resources.models.pipelines import probe_machine

        models = self.models
        return probe_machine(models.device, models.sources())

    def pick(self) -> tuple[RunSettings, Machine]:
        """The settings this run uses, and the machine they were picked for."""
        machine = self.machine()
        return pick_run_settings(self.name, machine), machine


class EditorResource(dg.ConfigurableResource):
    """The editor backends enrichment can use, and how the Qwen-Image-Edit one loads.

    The release comes from the recipe (`edit_model`); its source, quantization and device from `models`
    (FLEN_QWEN_EDIT_MODEL, FLEN_QWEN_EDIT_2511_MODEL, ...). LoRA sources: a hub file
    (`org/repo/file.safetensors`), a local path, or the tiny pack's (`tiny:<lora>`); each registered LoRA
    goes on the release it was made for only (registry.LORAS).
    """

    models: ModelsResource
    qwen_output_area: int = 0  # pixels of an edit; 0: 1024x1024, or 256x256 on the tiny pack (its input images too)
    qwen_loras: dict[str, str] = {name: f"tiny:{name}" for name in (
        "angles", "lightning-8step", "lightning-4step", "lightning-8step-2511", "lightning-4step-2511")}
    _editors: dict = PrivateAttr(default_factory=dict)

    def get(self, backend: str, edit_model: str = DEFAULT_EDIT_MODEL) -> Editor:
        """The editor registered as `backend` (classic, qwen_edit; the latter for the release `edit_model`),
        created once per process."""
        key = (backend, edit_model if backend == "qwen_edit" else None)
        if key not in self._editors:
            if backend == "qwen_edit":
                from flen_resources.editors.qwen_edit import QwenEditEditor

                m = self.models
                source = m.source(edit_model)
                tiny = source == "tiny"
                area = self.qwen_output_area or (256 * 256 if tiny else 1024 * 1024)
                # The tiny pack VAE-encodes its input images at the output's area, not the pipeline's 1024x1024:
                # its random weights only exercise the code path, and a CPU edit runs 7x faster (3.3 s, not 23 s).
                self._editors[key] = QwenEditEditor(model=source, quantization=m.quantization, device=m.device,
                                                    loras=self.qwen_loras, output_area=area, model_key=edit_model,
                                                    memory_budget_gib=m.memory_budget_gib,
                                                    references_at_output_area=tiny)
            else:
                self._editors[key] = get_editor(backend)
        return self._editors[key]


class GeneratorResource(dg.ConfigurableResource):
    """FLUX.1-dev text-to-image with the character LoRA (used by evaluation and synthetic batches)."""

    models: ModelsResource
    _generator: object = PrivateAttr(default=None)

    def get(self):
        """The FluxGenerator, created once per process."""
        if self._generator is None:
            from flen_resources.generators.flux import FluxGenerator

            m = self.models
            self._generator = FluxGenerator(model=m.flux_model, quantization=m.quantization, device=m.device,
                                            memory_budget_gib=m.memory_budget_gib)
        return self._generator


class TrainerResource(dg.ConfigurableResource):
    """The LoRA trainers (FLUX.1-dev on training sets, Qwen-Image-Edit on edit triplets).

    Run folders (cache, checkpoints, outputs) live under the project's state folder, so a killed
    materialization resumes from its last checkpoint when it is launched again.
    """

    models: ModelsResource

    def flux(self, work_dir: Path, log=print):
        """A FluxLoraTrainer for one run folder."""
        from flen_resources.trainers.flux_lora import FluxLoraTrainer

        return FluxLoraTrainer(model=self.models.flux_model, work_dir=work_dir, log=log,
                               memory_budget_gib=self.models.memory_budget_gib)

    def qwen_edit(self, work_dir: Path, log=print, edit_model: str = DEFAULT_EDIT_MODEL):
        """A QwenEditLoraTrainer of the release `edit_model` for one run folder."""
        from flen_resources.trainers.qwen_edit_lora import QwenEditLoraTrainer

        return QwenEditLoraTrainer(model=self.models.source(edit_model), work_dir=work_dir, log=log,
                                   model_key=edit_model, memory_budget_gib=self.models.memory_budget_gib)

    def train_config(self, knobs: dict[str, Any], model_key: str = "flux.1-dev") -> LoraTrainConfig:
        """The LoraTrainConfig a run records: an asset's knobs, the models' quantization, device and memory budget,
        `auto` decided for the model `model_key`."""
        return LoraTrainConfig.from_knobs(**knobs, quantization=self.models.quantization,
                                          device=self.models.device).resolved(model_key,
                                                                              self.models.memory_budget_gib)

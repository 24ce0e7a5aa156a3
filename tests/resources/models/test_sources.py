"""Model sources given bad input: pickle weights, incomplete folders, models that are not here (issue 3)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_flen

from flen_resources.models.sources import ModelFolderError, ModelNotAvailable, resolve_model

QWEN = "qwen-image-edit-2509"
QWEN_HUB = "Qwen/Qwen-Image-Edit-2509"
FLUX = "flux.1-dev"
FLUX_HUB = "black-forest-labs/FLUX.1-dev"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any torch.load / pickle.load(s) call fails the test (and is recorded)."""
    calls: list[str] = []

    def refuse(name):
        def _refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called: a pickle was about to be loaded")
        return _refuse

    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    return calls


# -- pickle weights ---------------------------------------------------------------------------------


def test_pickle_weights_in_a_model_folder_are_refused_before_any_load(qwen_folder, no_unpickling):
    transformer = qwen_folder / "transformer"
    (transformer / "diffusion_pytorch_model.safetensors").unlink()
    (transformer / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelFolderError) as err:
        resolve_model(QWEN, str(qwen_folder))
    message = str(err.value)
    assert "pickle" in message
    assert str(transformer) in message and "diffusion_pytorch_model.bin" in message
    assert "safetensors" in message
    assert no_unpickling == []


def test_the_editor_refuses_a_pickle_folder_before_loading_the_pipeline(qwen_folder, no_unpickling, monkeypatch):
    from flen_resources.editors import qwen_edit

    (qwen_folder / "vae" / "diffusion_pytorch_model.safetensors").rename(
        qwen_folder / "vae" / "diffusion_pytorch_model.ckpt")
    monkeypatch.setattr(qwen_edit, "load_pipeline", lambda *a, **k: pytest.fail("load_pipeline was reached"))
    editor = qwen_edit.QwenEditEditor(model=str(qwen_folder), device="cpu")
    with pytest.raises(ModelFolderError, match=r"pickle") as err:
        editor.pipe  # noqa: B018
    assert str(qwen_folder / "vae") in str(err.value)
    assert no_unpickling == []


# -- incomplete folders --------------------------------------------------------------------------------


def test_missing_component_folder(qwen_folder):
    shutil.rmtree(qwen_folder / "vae")
    with pytest.raises(ModelFolderError) as err:
        resolve_model(QWEN, str(qwen_folder))
    assert "component folder 'vae/' is missing" in str(err.value)
    assert str(qwen_folder) in str(err.value)


def test_missing_model_index(qwen_folder):
    (qwen_folder / "model_index.json").unlink()
    with pytest.raises(ModelFolderError) as err:
        resolve_model(QWEN, str(qwen_folder))
    assert "model_index.json is missing" in str(err.value)
    assert str(qwen_folder) in str(err.value)


def test_model_index_that_is_not_json(qwen_folder):
    (qwen_folder / "model_index.json").write_bytes(bytes(range(256)))  # binary garbage, not even UTF-8
    with pytest.raises(ModelFolderError) as err:
        resolve_model(QWEN, str(qwen_folder))
    assert "model_index.json is not valid JSON" in str(err.value)
    assert str(qwen_folder) in str(err.value)


def _shard(transformer: Path, n_shards: int) -> list[str]:
    names = [f"diffusion_pytorch_model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]
    (transformer / "diffusion_pytorch_model.safetensors").rename(transformer / names[0])
    return names


def test_sharded_index_listing_an_absent_shard(qwen_folder):
    transformer = qwen_folder / "transformer"
    names = _shard(transformer, 2)
    index = {"metadata": {"total_size": 1}, "weight_map": {"proj_out.weight": names[0], "proj_out.bias": names[1]}}
    (transformer / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError) as err:
        resolve_model(QWEN, str(qwen_folder))
    message = str(err.value)
    assert "missing weight shard" in message
    assert names[1] in message and names[0] not in message
    assert str(transformer) in message


def test_sharded_index_that_is_not_json(qwen_folder):
    transformer = qwen_folder / "transformer"
    _shard(transformer, 1)
    (transformer / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(ModelFolderError) as err:
        resolve_model(QWEN, str(qwen_folder))
    assert "diffusion_pytorch_model.safetensors.index.json is not valid" in str(err.value)
    assert str(transformer) in str(err.value)


def test_config_without_weights(qwen_folder):
    (qwen_folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFolderError) as err:
        resolve_model(QWEN, str(qwen_folder))
    assert "config.json but no .safetensors weights" in str(err.value)
    assert str(qwen_folder / "vae") in str(err.value)


def test_an_intact_copy_resolves_as_a_folder(qwen_folder, tiny_pack):
    """The control for the tests above: the unmodified copy is accepted."""
    resolved = resolve_model(QWEN, str(qwen_folder))
    assert resolved.kind == "folder" and resolved.path == qwen_folder.resolve()
    assert resolved.revision == resolve_model(QWEN, "tiny").revision  # same content, same hash


# -- models that are not here ------------------------------------------------------------------------


def test_missing_qwen_says_how_to_get_it(offline_empty_hub):
    with pytest.raises(ModelNotAvailable) as err:
        resolve_model(QWEN, QWEN_HUB)
    message = str(err.value)
    assert QWEN_HUB in message
    assert "not in the Hugging Face cache" in message
    assert str(offline_empty_hub) in message and "HF_HUB_OFFLINE=1" in message
    assert f"hf download {QWEN_HUB}" in message
    assert "tiny pack" in message and "`tiny`" in message
    assert "licence" not in message  # Qwen-Image-Edit is not gated


def test_missing_flux_mentions_the_gated_licence_step(offline_empty_hub):
    with pytest.raises(ModelNotAvailable) as err:
        resolve_model(FLUX, FLUX_HUB)
    message = str(err.value)
    assert FLUX_HUB in message
    assert f"accept the licence at https://huggingface.co/{FLUX_HUB}" in message and "hf auth login" in message
    assert f"hf download {FLUX_HUB}" in message
    assert "tiny pack" in message


def test_missing_pinned_revision(offline_empty_hub):
    with pytest.raises(ModelNotAvailable) as err:
        resolve_model(QWEN, f"{QWEN_HUB}@{COMMIT}")
    assert QWEN_HUB in str(err.value) and "hf download" in str(err.value)


def test_missing_folder_source(tmp_path):
    folder = tmp_path / "no-such-model"
    with pytest.raises(ModelNotAvailable) as err:
        resolve_model(QWEN, str(folder))
    assert f"folder {folder} does not exist" in str(err.value)
    assert "tiny pack" in str(err.value)


def test_unknown_model_key():
    with pytest.raises(KeyError, match=r"unknown model 'sdxl'.*qwen-image-edit-2509.*flux\.1-dev"):
        resolve_model("sdxl", "tiny")


def _fake_hub_cache(cache: Path, qwen_src: Path, commit: str = COMMIT) -> Path:
    repo = cache / ("models--" + QWEN_HUB.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    snapshot = repo / "snapshots" / commit
    shutil.copytree(qwen_src, snapshot)
    return snapshot


def test_a_cached_hub_model_resolves_offline(offline_empty_hub, tiny_pack):
    snapshot = _fake_hub_cache(offline_empty_hub, tiny_pack / QWEN)
    resolved = resolve_model(QWEN, QWEN_HUB)
    assert resolved.kind == "hub"
    assert resolved.model_id == QWEN_HUB
    assert resolved.revision == COMMIT
    assert resolved.path.resolve() == snapshot.resolve()
    assert resolved.ref == f"{QWEN_HUB}@{COMMIT[:12]}"
    # pinned to the same commit, and with downloads not allowed: the same snapshot
    assert resolve_model(QWEN, f"{QWEN_HUB}@{COMMIT}", allow_download=False).path.resolve() == snapshot.resolve()


def test_a_cached_hub_snapshot_is_still_checked(offline_empty_hub, tiny_pack):
    snapshot = _fake_hub_cache(offline_empty_hub, tiny_pack / QWEN)
    shutil.rmtree(snapshot / "vae")
    with pytest.raises(ModelFolderError, match=r"component folder 'vae/' is missing"):
        resolve_model(QWEN, QWEN_HUB)


# -- the CLI -------------------------------------------------------------------------------------------


def test_models_status_reports_a_missing_model_and_exits_0(tmp_path, monkeypatch, tiny_pack):
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.setenv("FLEN_QWEN_EDIT_MODEL", QWEN_HUB)
    monkeypatch.delenv("FLEN_FLUX_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    proc = run_flen("models", "status", project=project, timeout=300)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    qwen = [line for line in lines if line.startswith("✗ qwen-image-edit-2509")]
    assert len(qwen) == 1, proc.stdout
    assert QWEN_HUB in qwen[0] and "not in the Hugging Face cache" in qwen[0]
    assert any(line.startswith("✓ flux.1-dev") and "tiny" in line for line in lines), proc.stdout

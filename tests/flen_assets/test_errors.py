"""Errors that say why: a failed `flen` command ends with one line naming the cause and the fix; the
trace only with --debug, and always in the run's event log.

The failure modes: a missing model, nf4 on a CPU (both in a run's step, and in `flen train flux`), an
unreachable project folder, an error nobody expected. (An unknown character and a skipped iteration:
test_partition_control.py.) One source_images run per module; each failing run is enriched_images
alone with a one-entry Qwen-Image-Edit recipe, which fails at its first edit.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import skimage.data
from conftest import run_flen, shared_project
from PIL import Image
from typer.testing import CliRunner

from flen_assets.cli import app
from flen_resources.project import Project

CHARACTER = "astronaut"
QWEN_ONLY = """\
name = "qwen-only"
version = 1
editor = "qwen_edit"

[[entries]]
id = "left-45"
preset = "rotate-left-45"
caption = "three-quarter view from the left"
"""


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sourced(tmp_path_factory: pytest.TempPathFactory):
    """A project whose astronaut|v1 has source_images, and a run config that edits with Qwen only."""
    from flen_assets.definitions import defs
    from flen_assets.partitions import add_partitions
    from flen_assets.runs import init_project

    with shared_project(tmp_path_factory, "errors") as project:
        instance = init_project(project)
        inbox = project.inbox_for(CHARACTER)
        inbox.mkdir(parents=True)
        astro = Image.fromarray(skimage.data.astronaut())
        (inbox / "portrait.jpg").write_bytes(_jpeg(astro.crop((40, 0, 400, 320))))
        (inbox / "closeup.jpg").write_bytes(_jpeg(astro.crop((120, 40, 320, 210)).resize((400, 340))))
        key = add_partitions(instance, CHARACTER, "v1")
        result = defs.resolve_job_def("training_set_job").execute_in_process(
            instance=instance, partition_key=str(key), raise_on_error=False,
            asset_selection=[dg.AssetKey("source_images")])
        assert result.success
        recipe = project.root / "qwen_only.toml"
        recipe.write_text(QWEN_ONLY)
        config = project.root / "qwen_only.yaml"
        config.write_text(f"ops:\n  enriched_images:\n    config:\n      recipe: {recipe}\n")
        yield project, config


def _edit(project: Project, config: Path, *flen_options: str) -> tuple[str, str, str]:
    """`flen [OPTIONS] materialize astronaut v1 --from enriched_images` with the Qwen-only recipe:
    (stdout, stderr, the run id)."""
    proc = run_flen(*flen_options, "materialize", CHARACTER, "v1", "--from", "enriched_images",
                    "--config", str(config), project=project.root, check=False)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    run_id = re.search(r"^run ([0-9a-f-]{36}): the trace is", proc.stderr, re.M)
    assert run_id, proc.stderr
    return proc.stdout, proc.stderr, run_id.group(1)


def _last_line(text: str) -> str:
    return text.rstrip().splitlines()[-1]


def _assert_one_cause_line(stdout: str, stderr: str, start: str) -> str:
    """The command ends with exactly one `error:` line, naming the step and partition; no trace."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert _last_line(stderr) == errors[0]
    assert errors[0].startswith(f"error: {start}"), errors[0]
    for text in (stdout, stderr):
        assert "Traceback" not in text and "Stack Trace" not in text and 'File "' not in text, text
        assert "Error occurred while executing op" not in text, text
    return errors[0]


def _trace_in_event_log(project: Project, run_id: str) -> str:
    """The stack trace the run's event log keeps for its failed step (what the Dagster UI shows)."""
    from flen_assets.instance import get_instance

    failures = get_instance(project).all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    assert len(failures) == 1
    return failures[0].dagster_event.event_specific_data.error.to_string()


def test_missing_model_is_one_line_with_its_setting(sourced, monkeypatch):
    project, config = sourced
    monkeypatch.setenv("FLEN_QWEN_EDIT_MODEL", "/nonexistent")
    stdout, stderr, run_id = _edit(project, config)
    line = _assert_one_cause_line(stdout, stderr, "enriched_images astronaut|v1: model Qwen/Qwen-Image-Edit-2509")
    assert "folder /nonexistent does not exist" in line
    assert "point FLEN_QWEN_EDIT_MODEL at a downloaded copy" in line and "FLEN_QWEN_EDIT_MODEL=tiny" in line
    assert "ModelNotAvailable" not in line  # FLENwheel's own error: the message, not the class
    assert f"Runs > {run_id[:8]}" in stderr and "flen --debug" in stderr  # where the trace is
    assert "✗ enriched_images: model Qwen/Qwen-Image-Edit-2509" in stdout
    trace = _trace_in_event_log(project, run_id)
    assert "resolve_model" in trace and "hf download Qwen/Qwen-Image-Edit-2509" in trace


def test_a_lora_of_the_other_release_is_one_line_naming_edit_model(sourced):
    project, _ = sourced
    recipe = project.root / "wrong_release.toml"
    recipe.write_text(QWEN_ONLY.replace('editor = "qwen_edit"', 'editor = "qwen_edit"\nedit_model = "qwen-image-edit-2511"')
                      + "loras = { lightning-8step = 1.0 }\n")
    config = project.root / "wrong_release.yaml"
    config.write_text(f"ops:\n  enriched_images:\n    config:\n      recipe: {recipe}\n")
    stdout, stderr, _ = _edit(project, config)
    line = _assert_one_cause_line(stdout, stderr, f"enriched_images astronaut|v1: {recipe}: entry 'left-45': ")
    assert line.endswith("LoRA 'lightning-8step' was made for qwen-image-edit-2509, not qwen-image-edit-2511; use "
                         "'lightning-8step-2511' instead, or set edit_model = \"qwen-image-edit-2509\" at the top of "
                         "the recipe"), line


def test_nf4_on_a_cpu_is_one_line_naming_flen_quantization(sourced, monkeypatch):
    project, config = sourced
    monkeypatch.setenv("FLEN_QUANTIZATION", "nf4")
    monkeypatch.setenv("FLEN_DEVICE", "cpu")  # a CPU even on a GPU machine
    stdout, stderr, run_id = _edit(project, config)
    line = _assert_one_cause_line(stdout, stderr, "enriched_images astronaut|v1: nf4 quantization needs a CUDA GPU")
    assert "set FLEN_QUANTIZATION=none" in line and "run on a CUDA GPU" in line
    assert "load_pipeline" in _trace_in_event_log(project, run_id)


def test_debug_shows_the_trace_and_still_ends_with_the_cause(sourced, monkeypatch):
    project, config = sourced
    monkeypatch.setenv("FLEN_QUANTIZATION", "nf4")
    monkeypatch.setenv("FLEN_DEVICE", "cpu")
    stdout, stderr, run_id = _edit(project, config, "--debug")
    assert "Stack Trace:" in stderr and "load_pipeline" in stderr  # Dagster's console log, in full
    assert "STEP_FAILURE" in stderr
    assert _last_line(stderr).startswith("error: enriched_images astronaut|v1: nf4 quantization needs a CUDA GPU")


# -- `flen train flux`: the same causes outside a project ---------------------------------------------

@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "dataset"
    folder.mkdir()
    for i in range(4):  # the fewest `flen train` takes
        Image.new("RGB", (64, 64), (40 * i, 90, 120)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("photo of kc_flen\n")
    return folder


def _train(dataset: Path, tmp_path: Path, *args: str, debug: bool = False):
    return CliRunner().invoke(app, [*(["--debug"] if debug else []), "train", "flux", str(dataset),
                                    "--out", str(tmp_path / "run"), "--steps", "2", "--resolution", "64", *args])


def test_train_with_a_missing_flux_model(dataset, tmp_path, monkeypatch, traces_off_after):
    monkeypatch.setenv("FLEN_FLUX_MODEL", "/nonexistent")
    result = _train(dataset, tmp_path, "--device", "cpu")
    assert result.exit_code == 1, result.output
    line = _last_line(result.stderr)
    assert line.startswith(f"error: {dataset}: model black-forest-labs/FLUX.1-dev"), line
    assert "folder /nonexistent does not exist" in line and "point FLEN_FLUX_MODEL at a downloaded copy" in line
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # the download steps: --debug only
    assert "hf download" in _train(dataset, tmp_path, "--device", "cpu", debug=True).stderr


def test_train_nf4_on_a_cpu(dataset, tmp_path):
    result = _train(dataset, tmp_path, "--quantization", "nf4", "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (
        f"error: {dataset}: nf4 quantization needs a CUDA GPU and this runs on cpu: set FLEN_QUANTIZATION=none "
        "(or auto: nf4 on a GPU, none on the CPU; `flen train`: --quantization none), or run on a CUDA GPU")


# -- the project folder ----------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["--project", "FLEN_PROJECT_DIR"])
def test_unreachable_project_folder(tmp_path, monkeypatch, how):
    missing = tmp_path / "gone" / "project"
    monkeypatch.delenv("FLEN_PROJECT_DIR", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(missing / ".flen" / "dagster"))  # `flen init` points it there
    if how == "FLEN_PROJECT_DIR":
        monkeypatch.setenv("FLEN_PROJECT_DIR", str(missing))
    args = ["--project", str(missing)] if how == "--project" else []
    for command in (["materialize", CHARACTER, "v1"], ["character", "list"], ["lineage", CHARACTER, "v1"]):
        result = CliRunner().invoke(app, [*command, *args])
        assert result.exit_code == 1, (command, result.output)
        assert result.stderr.strip() == (
            f"error: project folder {missing} ({'$' if how != '--project' else ''}{how}) does not exist or cannot be "
            f"reached: pass --project DIR (or set FLEN_PROJECT_DIR) to an existing project, or create one with "
            f"`flen init --project {missing}`"), result.stderr
    assert not missing.parent.exists(), "nothing was created"
    assert CliRunner().invoke(app, ["init", *args]).exit_code == 0  # `flen init` creates it
    assert (missing / ".flen" / "dagster").is_dir()


def test_project_folder_that_is_a_file(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("")
    result = CliRunner().invoke(app, ["character", "list", "--project", str(file)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: project folder {file} (--project) is not a folder")


# -- errors nobody expected ----------------------------------------------------------------------------

@pytest.fixture
def traces_off_after():
    """--debug sets a process-wide switch; later tests of this process must not see it on."""
    from flen_assets.console import show_traces

    yield
    show_traces(False)


def test_an_unexpected_error_is_one_line_and_its_trace_is_behind_debug(project, monkeypatch, traces_off_after):
    import flen_assets.commands.characters as characters

    def broken(*_args, **_kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(characters, "init_project", broken)
    result = CliRunner().invoke(app, ["character", "list"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: KeyError: 'boom'  (unexpected: `flen --debug ...` shows the trace)"
    assert result.exception is None or isinstance(result.exception, SystemExit)
    debug = CliRunner().invoke(app, ["--debug", "character", "list"])
    assert isinstance(debug.exception, KeyError)  # raised: Python prints its trace
    monkeypatch.setenv("FLEN_DEBUG", "1")
    assert isinstance(CliRunner().invoke(app, ["character", "list"]).exception, KeyError)


def test_a_reader_that_leaves_early_is_no_error(tmp_path):
    """`flen character list | head -1`: the reader left while the command still wrote; it stops without a word."""
    # Whether a real `| head` closes before the last write is a race; a command that meets the closed
    # pipe is not. In a process of its own: typer's handler rewires that process's stdout and stderr.
    script = ("import sys, flen_assets.commands.characters as c\n"
              "def gone(*_a, **_k): raise BrokenPipeError(32, 'Broken pipe')\n"
              "c.init_project = gone\n"
              "from flen_assets.cli import app\n"
              "app(['character', 'list', '--project', sys.argv[1]])\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.stderr == "" and proc.returncode == 1  # silent; status 1 as click and Python give on EPIPE


# -- the root cause of a step failure --------------------------------------------------------------

def _error(message: str, cls_name: str, cause=None):
    from dagster._utils.error import SerializableErrorInfo

    return SerializableErrorInfo(message=message, stack=[], cls_name=cls_name, cause=cause)


def test_root_cause_is_the_error_the_step_raised():
    from flen_assets.runs import root_cause

    hub = _error("huggingface_hub.errors.LocalEntryNotFoundError: not in the cache\n", "LocalEntryNotFoundError")
    ours = _error("flen_resources.models.sources.ModelNotAvailable: model X is not available here: set FLEN_X\n"
                  "  how to download it\n", "ModelNotAvailable", cause=hub)
    wrapped = _error('dagster._core.errors.DagsterExecutionStepExecutionError: Error occurred while executing op '
                     '"flux_lora":\n', "DagsterExecutionStepExecutionError", cause=ours)
    assert root_cause(wrapped) == "model X is not available here: set FLEN_X"  # not the hub's error under it
    other = _error('dagster._core.errors.DagsterExecutionStepExecutionError: Error occurred while executing op "x":\n',
                   "DagsterExecutionStepExecutionError", cause=_error("KeyError: 'missing'\n", "KeyError"))
    assert root_cause(other) == "KeyError: 'missing'"
    third_party = _error("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n", "OutOfMemoryError")
    assert root_cause(third_party) == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"
    failure = _error("dagster._core.definitions.events.Failure: the training set would be empty: see filtered_images\n",
                     "Failure")
    assert root_cause(failure) == "the training set would be empty: see filtered_images"


# -- Run settings: GPU-sized work never runs on a CPU ---------------------------------------------------

def test_gpu_sized_settings_on_a_cpu_are_refused_before_any_edit(sourced, monkeypatch):
    project, _ = sourced
    monkeypatch.setenv("FLEN_DEVICE", "cpu")  # a CPU even on a GPU machine
    proc = run_flen("materialize", CHARACTER, "v1", "--from", "enriched_images", "--settings", "large-card",
                    project=project.root, check=False)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    line = _assert_one_cause_line(proc.stdout, proc.stderr,
                                  "enriched_images astronaut|v1: run settings 'large-card' are sized for a CUDA GPU "
                                  "and this runs on a CPU: choose cpu-demo")
    assert "--settings cpu-demo" in line and "or run on a GPU" in line


def test_a_misspelt_settings_name_is_refused_before_the_run(sourced):
    project, _ = sourced
    proc = run_flen("materialize", CHARACTER, "v1", "--settings", "24gb-crad", project=project.root, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: run settings '24gb-crad' do not exist: did you mean '24gb-card'? "
                                   "--settings takes one of auto, cpu-demo, 24gb-card, large-card")


def test_train_refuses_gpu_settings_on_a_cpu_and_says_which_settings_it_used(dataset, tmp_path):
    result = _train(dataset, tmp_path, "--settings", "24gb-card", "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [
        "error: run settings '24gb-card' are sized for a CUDA GPU and this runs on a CPU: choose cpu-demo "
        "(--settings cpu-demo) or run on a GPU"]
    result = _train(dataset, tmp_path, "--device", "cpu", "--quantization", "none", "--steps", "1")
    assert result.exit_code == 0, result.output
    assert "run settings cpu-demo (auto: a CPU and the tiny pack): steps 1, resolution 64" in result.stdout

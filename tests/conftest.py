"""Shared fixtures: throwaway projects, and one demo project materialized per test session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _import_the_installed_flen_assets() -> None:
    """Import the flen_assets package before tests/ (pyproject's pythonpath) can stand in for it.

    The editable install finds the package after sys.path's own entries, so `import flen_assets` from a run of
    tests/resources alone found tests/flen_assets first and made an empty namespace package of it.
    """
    here = str(Path(__file__).resolve().parent)
    kept = list(sys.path)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]
    try:
        import flen_assets  # noqa: F401
    finally:
        sys.path[:] = kept


_import_the_installed_flen_assets()

from flen_resources.project import Project  # noqa: E402

FLEN = [sys.executable, "-m", "flen_assets"]

# A test runner started in the background of a non-interactive shell ignores SIGINT, and its
# children inherit that: the tests that press Ctrl-C on `flen` would then test nothing. A Python
# handler is not inherited (exec resets it), so the children get the default, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Under pytest-xdist every worker, and each process its tests start, would run torch on every core: share
# the cores out instead (the env reaches the subprocesses; OpenMP threads spinning on a full box cost more).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def run_flen(*args: str, project: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `flen` CLI in a subprocess against `project`."""
    env = {**os.environ, "FLEN_PROJECT_DIR": str(project), "DAGSTER_HOME": str(project / ".flen" / "dagster"),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*FLEN, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"flen {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group tests for pytest-xdist's loadgroup: a module's tests on one worker, every demo_project user on one.

    A module's tests share its module-scoped fixtures (a webserver, a materialized project), built once per worker;
    the demo project takes minutes to build, so its users go together rather than each worker building its own.
    """
    for item in items:
        group = "demo_project" if "demo_project" in getattr(item, "fixturenames", ()) else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook sends the test ids to the controller
def pytest_collection_finish(session: pytest.Session) -> None:
    """Stop a worker whose pytest drops xdist's group suffix: its tests would scatter and rebuild every fixture."""
    grouped = getattr(session.config.option, "loadgroup", False)
    if grouped and session.items and "@" not in session.items[0].nodeid:
        raise pytest.UsageError("pytest-xdist's --dist loadgroup lost its groups under this pytest "
                                "(pytest-dev/pytest-xdist#1386): install pyproject.toml's pinned pytest (scripts/setup.sh)")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    """An empty project folder, selected through $FLEN_PROJECT_DIR for this test only."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.setenv("FLEN_PROJECT_DIR", str(root))
    monkeypatch.setenv("DAGSTER_HOME", str(root / ".flen" / "dagster"))
    return Project(root)


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A project on which `flen demo` has run (once per session, through the real CLI)."""
    root = tmp_path_factory.mktemp("demo") / "project"
    root.mkdir()
    run_flen("demo", project=root, timeout=1500)  # minutes alone; more beside other test workers
    return Project(root)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: one thread is faster, and immune to other processes on a small CI box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextmanager
def shared_project(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Project]:
    """A fresh project for a module-scoped fixture (the `project` fixture is per test), selected
    through $FLEN_PROJECT_DIR / $DAGSTER_HOME while the fixture is active."""
    root = tmp_path_factory.mktemp(name) / "project"
    root.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLEN_PROJECT_DIR", str(root))
        mp.setenv("DAGSTER_HOME", str(root / ".flen" / "dagster"))
        yield Project(root)

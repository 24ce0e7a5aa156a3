"""The per-card GPU lease: real processes take distinct cards, wait when all are held, and a killed holder's card comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flen_resources.gpu_lease import GPU_POOL_LIMIT_ENV, GpuLeases, count_gpus, gpu_pool_limit

# A process that leases one of cards 0 and 1, writes which to <out>, and holds it until killed or for <hold> s.
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from flen_resources.gpu_lease import GpuLeases
    lock_dir, out, hold = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    with GpuLeases([0, 1], lock_dir).lease(out.name, say=lambda m: print(m, flush=True)) as lease:
        out.write_text(str(lease.device))
        time.sleep(hold)
""")


def _holder(lock_dir: Path, out: Path, hold_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir), str(out), str(hold_s)],
                            stdout=subprocess.PIPE, text=True)


def _wait_for(path: Path, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return path.read_text()


def test_two_processes_get_two_cards_and_a_third_waits_for_one(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    first, second = _holder(locks, tmp_path / "a", 60), _holder(locks, tmp_path / "b", 60)
    try:
        assert {_wait_for(tmp_path / "a"), _wait_for(tmp_path / "b")} == {"0", "1"}
        held = GpuLeases([0, 1], locks).holders()
        assert all(held.values()) and any("a (" in h for h in held.values())
        third = _holder(locks, tmp_path / "c", 0)
        time.sleep(1.5)
        assert not (tmp_path / "c").exists(), "a third process got a card while both were held"
        first.kill()  # SIGKILL: no cleanup code runs; the kernel drops the lock
        first.wait()
        freed = _wait_for(tmp_path / "a")
        assert _wait_for(tmp_path / "c") == freed
        out, _ = third.communicate(timeout=30)
        assert "waiting for a free GPU" in out and f"leased GPU cuda:{freed}" in out
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()


def test_a_lease_is_given_back_when_the_body_fails(tmp_path: Path) -> None:
    leases = GpuLeases([0], tmp_path)
    with pytest.raises(RuntimeError), leases.lease("failing step") as lease:
        assert lease is not None and leases.holders() == {0: lease.holder}
        raise RuntimeError("the step failed")
    assert leases.holders() == {0: None}
    with leases.lease("next step") as again:
        assert again.device == 0


def test_a_step_interrupted_by_sigterm_gives_its_card_back(tmp_path: Path) -> None:
    holder = _holder(tmp_path / "locks", tmp_path / "a", 60)
    _wait_for(tmp_path / "a")
    os.kill(holder.pid, signal.SIGTERM)
    holder.wait(timeout=30)
    assert GpuLeases([0, 1], tmp_path / "locks").holders() == {0: None, 1: None}


def test_waiting_gives_up_after_the_timeout_and_names_the_holder(tmp_path: Path) -> None:
    leases = GpuLeases([0], tmp_path)
    with leases.lease("flux_lora alice|v1"):
        holder = _holder(tmp_path, tmp_path / "x", 0)  # cards 0 and 1: card 1 is free for it
        assert _wait_for(tmp_path / "x") == "1"
        holder.wait()
        with pytest.raises(TimeoutError, match="flux_lora alice"):
            with GpuLeases([0], tmp_path).lease("lora_eval bob|v1", timeout_s=0.2):
                pass


def test_a_host_without_cards_leases_nothing(tmp_path: Path) -> None:
    with GpuLeases([], tmp_path).lease("cpu step") as lease:
        assert lease is None


@pytest.mark.parametrize("visible, expected", [("0,1", 2), ("3", 1), ("", 0), ("-1", 0), ("0,-1,1", 1)])
def test_count_gpus_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch, visible: str, expected: int) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert count_gpus() == expected


def test_the_pool_limit_is_the_number_of_cards_or_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GPU_POOL_LIMIT_ENV, raising=False)
    assert gpu_pool_limit(2) == 2
    assert gpu_pool_limit(0) == 1  # a CPU-only host still runs its GPU steps, one at a time
    monkeypatch.setenv(GPU_POOL_LIMIT_ENV, "6")
    assert gpu_pool_limit(2) == 6
    monkeypatch.setenv(GPU_POOL_LIMIT_ENV, "two")
    with pytest.raises(ValueError, match="FLEN_GPU_POOL_LIMIT='two' is not a number of GPUs"):
        gpu_pool_limit(2)

"""GPU-only: the per-card lease on real cards. Processes that each take a card through `step_gpu`
put their tensors on different cards through pick_device("auto"), and a process waiting for a card
gets the one whose holder was killed with SIGKILL. CI has no GPU and skips these; the device
machine runs them (two cards needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from flen_resources.gpu_lease import GPU_LOCK_DIR_ENV

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

# A GPU step: lease a card, put a tensor on pick_device("auto"), write what it got to <out>, hold the card.
STEP = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    from flen_resources.gpu_lease import step_gpu
    from flen_resources.models.pipelines import pick_device
    out, hold = Path(sys.argv[1]), float(sys.argv[2])
    with step_gpu(out.name, say=lambda m: print(m, flush=True)) as lease:
        tensor = torch.ones(1 << 20, device=pick_device("auto"))
        torch.cuda.synchronize()
        out.write_text(json.dumps({"lease": lease.device, "current": torch.cuda.current_device(),
                                   "tensor": tensor.device.index,
                                   "allocated": torch.cuda.memory_allocated(tensor.device)}))
        time.sleep(hold)
""")


def _step(lock_dir: Path, out: Path, hold_s: float) -> subprocess.Popen:
    # output to a file: a pipe nobody reads could fill while the test waits
    with out.with_suffix(".log").open("w") as log:
        return subprocess.Popen([sys.executable, "-c", STEP, str(out), str(hold_s)],
                                env={**os.environ, GPU_LOCK_DIR_ENV: str(lock_dir)}, stdout=log,
                                stderr=subprocess.STDOUT)


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 120) -> dict:
    deadline, log = time.monotonic() + timeout_s, path.with_suffix(".log")
    while not (path.exists() and path.read_text()):
        ended = proc.poll() is not None
        if ended and path.exists() and path.read_text():
            break  # written just before it ended
        assert not ended, f"{path.name} ended ({proc.returncode}) without writing: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"{path.name} never written: {log.read_text()[-2000:]}"
        time.sleep(0.1)
    return json.loads(path.read_text())


def _wait_for_line(log: Path, text: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not (log.exists() and text in log.read_text()):
        assert time.monotonic() < deadline, f"{text!r} never in {log.name}: {log.read_text()[-2000:] if log.exists() else ''}"
        time.sleep(0.1)


def test_two_steps_train_on_two_cards_and_a_waiting_step_gets_the_killed_ones(tmp_path: Path) -> None:
    locks, cards = tmp_path / "locks", list(range(torch.cuda.device_count()))
    holders = {name: _step(locks, tmp_path / name, 300) for name in [f"step{c}" for c in cards]}
    waiting = None
    try:
        got = {name: _wait_for(tmp_path / name, proc) for name, proc in holders.items()}
        for g in got.values():  # the lease, torch's current card and the tensor agree
            assert g["lease"] == g["current"] == g["tensor"] and g["allocated"] > 0, got
        assert sorted(g["lease"] for g in got.values()) == cards, got  # one card each

        waiting = _step(locks, tmp_path / "waiting", 0)
        _wait_for_line(tmp_path / "waiting.log", "waiting for a free GPU")
        assert not (tmp_path / "waiting").exists(), "a step got a card while every card was held"

        killed = "step1"
        holders[killed].kill()  # SIGKILL: no cleanup runs; the kernel drops the card's lock
        holders[killed].wait()
        freed = got[killed]["lease"]
        after = _wait_for(tmp_path / "waiting", waiting)
        assert after["lease"] == after["current"] == after["tensor"] == freed, after
        assert waiting.wait(timeout=120) == 0
        assert f"leased GPU cuda:{freed}" in (tmp_path / "waiting.log").read_text()
    finally:
        for proc in [*holders.values(), *([waiting] if waiting else [])]:
            proc.kill()
            proc.wait()

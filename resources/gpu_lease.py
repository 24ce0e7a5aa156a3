"""One GPU per step: a lease on a free card of this host, given back when the step ends, fails or is killed.

Dagster's `gpu` pool says how many GPU steps may run at once (its limit follows the number of
cards, `gpu_pool_limit`); the pool does not say which card. The lease does: each card of the host
has a lock file, a step takes the first card whose lock is free and holds the lock's open file for
as long as it runs. The lock is an `flock`, which the kernel drops when the holder's process ends
however it ends (kill -9 included), so a killed step can never keep a card. The lock folder is the
host's, not the project's: two project folders on one host share its cards.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flen_resources.atomic import write_text_atomic
from flen_resources.processes import ProcessRef

# The Dagster pool of the steps that put a big model on a card.
GPU_POOL = "gpu"
# Where the host's card locks live; one folder per user unless set (a host shared by users sets it
# to a folder all of them can write).
GPU_LOCK_DIR_ENV = "FLEN_GPU_LOCK_DIR"
# The `gpu` pool's limit when set (a cluster: the number of cards of all hosts); else this host's cards.
GPU_POOL_LIMIT_ENV = "FLEN_GPU_POOL_LIMIT"
_POLL_S = 0.5
_SAY_EVERY_S = 60.0


@dataclass(frozen=True)
class GpuLease:
    """A card held by this process: its CUDA index and who holds it."""

    device: int
    holder: str


def default_lock_dir() -> Path:
    """The host's card-lock folder: $FLEN_GPU_LOCK_DIR, else <tmp>/flen-gpu-leases-<uid>."""
    configured = os.environ.get(GPU_LOCK_DIR_ENV)
    return Path(configured) if configured else Path(tempfile.gettempdir()) / f"flen-gpu-leases-{os.getuid()}"


def count_gpus() -> int:
    """How many cards this process may use, without starting CUDA: CUDA_VISIBLE_DEVICES, else the driver's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        # CUDA stops at the first invalid entry ("-1" hides every card).
        return next((i for i, e in enumerate(entries) if e.startswith("-")), len(entries))
    driver = Path("/proc/driver/nvidia/gpus")
    return len(list(driver.iterdir())) if driver.is_dir() else 0


def visible_gpus() -> list[int]:
    """The CUDA indexes of this host's cards that this process sees ([] without CUDA)."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def gpu_pool_limit(n_gpus: int | None = None) -> int:
    """The `gpu` pool's limit: $FLEN_GPU_POOL_LIMIT, else the number of cards (one on a CPU-only host)."""
    configured = os.environ.get(GPU_POOL_LIMIT_ENV)
    if configured:
        try:
            limit = int(configured)
        except ValueError:
            limit = 0
        if limit < 1:
            raise ValueError(f"{GPU_POOL_LIMIT_ENV}={configured!r} is not a number of GPUs: set a whole number "
                             f"of 1 or more (the cards of every host of the cluster), or unset it")
        return limit
    return max(1, count_gpus() if n_gpus is None else n_gpus)


class GpuLeases:
    """The cards of one host and their locks."""

    def __init__(self, devices: Sequence[int], lock_dir: Path | None = None):
        self.devices = list(devices)
        self.lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()

    def _lock_file(self, device: int) -> Path:
        return self.lock_dir / f"gpu-{device}.lock"

    def _holder_file(self, device: int) -> Path:
        return self.lock_dir / f"gpu-{device}.holder"

    def try_lease(self, label: str) -> tuple[GpuLease, int] | None:
        """The first free card, locked, with its open lock descriptor; None when every card is held."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        for device in self.devices:
            fd = os.open(self._lock_file(device), os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            holder = f"{label} ({ProcessRef.current().encode()})"
            write_text_atomic(self._holder_file(device), json.dumps({"holder": holder}))
            return GpuLease(device, holder), fd
        return None

    def holders(self) -> dict[int, str | None]:
        """Who holds each card now (None: free); read for messages, never trusted for locking."""
        held: dict[int, str | None] = {}
        for device in self.devices:
            fd = os.open(self._lock_file(device), os.O_RDWR | os.O_CREAT, 0o666) if self.lock_dir.is_dir() else None
            try:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                held[device] = None
            except BlockingIOError:
                try:
                    held[device] = json.loads(self._holder_file(device).read_text())["holder"]
                except (OSError, ValueError, KeyError):
                    held[device] = "another process"
            finally:
                if fd is not None:
                    os.close(fd)
        return held

    @contextmanager
    def lease(self, label: str, say: Callable[[str], None] = lambda _: None,
              timeout_s: float | None = None) -> Iterator[GpuLease | None]:
        """Hold a free card for the body (None on a host without cards); waits while every card is held."""
        if not self.devices:
            yield None
            return
        started, said_at = time.monotonic(), None
        got = self.try_lease(label)
        while got is None:
            now = time.monotonic()
            if said_at is None or now - said_at >= _SAY_EVERY_S:
                held = "; ".join(f"cuda:{d} by {h}" for d, h in self.holders().items() if h)
                say(f"waiting for a free GPU: {held or 'all held'}")
                said_at = now
            if timeout_s is not None and now - started > timeout_s:
                raise TimeoutError(f"no GPU came free in {timeout_s:.0f} s (held: {self.holders()}): "
                                   "stop the runs that hold them, or wait longer")
            time.sleep(_POLL_S)
            got = self.try_lease(label)
        lease, fd = got
        say(f"leased GPU cuda:{lease.device}")
        try:
            yield lease
        finally:
            self._holder_file(lease.device).unlink(missing_ok=True)
            os.close(fd)  # drops the flock: the card is free


@contextmanager
def step_gpu(label: str, say: Callable[[str], None] = lambda _: None) -> Iterator[GpuLease | None]:
    """Lease a free card of this host for a GPU step and make it torch's current device for the body."""
    with GpuLeases(visible_gpus()).lease(label, say) as lease:
        if lease is not None:
            import torch

            # "auto" resolves to the current device (models.pipelines.pick_device), so every model,
            # offload hook and memory counter of the step lands on the leased card.
            torch.cuda.set_device(lease.device)
        yield lease

"""The test helpers' own rules: ports for parallel workers."""

from __future__ import annotations

import socket

import pytest

import tests_helpers


@pytest.fixture
def fresh_ports(monkeypatch: pytest.MonkeyPatch):
    """free_port as a new worker process sees it (no block handed out yet)."""
    monkeypatch.setattr(tests_helpers, "_next_ports", None)


@pytest.mark.parametrize(("worker", "start"), [("gw0", 20000), ("gw2", 20800), ("gw31", 20400)])
def test_an_xdist_worker_takes_ports_from_its_own_block(fresh_ports, monkeypatch, worker, start):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    ports = [tests_helpers.free_port() for _ in range(3)]
    assert all(start <= p < start + 400 for p in ports), ports
    assert len(set(ports)) == 3 and max(ports) < 32768, "distinct, below the ephemeral range"


def test_a_taken_port_is_skipped(fresh_ports, monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw5")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 22000))  # gw5's first port
        assert tests_helpers.free_port() == 22001


def test_without_xdist_the_kernel_picks(fresh_ports, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    port = tests_helpers.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free, as promised

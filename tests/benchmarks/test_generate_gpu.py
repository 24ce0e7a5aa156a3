"""benchmarks/generate_gpu.py's summary (each variant's best image time, the compiled speed-up) and its arguments."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import generate_gpu  # noqa: E402


def test_the_summary_takes_each_variant_s_best_image_time_and_skips_failures():
    summary = generate_gpu.summarize([{"variant": "eager", "s_per_image": 6.4}, {"variant": "compiled", "s_per_image": 4.1},
                                      {"variant": "eager", "s_per_image": 6.0}, {"variant": "compiled", "error": "boom"}])
    assert summary == {"best_s_per_image": {"eager": 6.0, "compiled": 4.1}, "compiled_speedup": 1.46}
    assert "compiled_speedup" not in generate_gpu.summarize([{"variant": "eager", "s_per_image": 6.0}])


def test_an_unknown_variant_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        generate_gpu.parse_args(["--variants", "eager,compild"])
    assert "no variant compild; choose from eager, compiled" in capsys.readouterr().err

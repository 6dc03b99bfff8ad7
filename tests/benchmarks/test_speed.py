"""The speed benchmark runs end to end (a smoke test: no timing is asserted, see benchmarks/speed.py)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

pytest.importorskip("peft")

SPEED = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "benchmarks", "speed.py")


def _speed_module():
    spec = importlib.util.spec_from_file_location("speed_benchmark", SPEED)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_prints_every_row(capsys):
    speed = _speed_module()
    speed.main(["--quick", "--repeats", "2", "--no-memory"])
    out = capsys.readouterr().out
    assert "max relative difference" in out  # ours and PEFT's Poly were checked to compute the same logits
    for label in ("train step (mixed)", "inference (mixed)", "generate (mixed)", "inference, 1 merged"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {label}"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and cells[-1].endswith("x")  # a time for ours and a ratio against the base
    assert "train step (mixed): vs peft_poly" in out


def test_timings_ratio_is_the_median_of_per_round_ratios():
    speed = _speed_module()
    t = speed.Timings(ours=[1.0, 2.0, 30.0], other=[2.0, 2.0, 10.0])
    assert t.median("ours") == 2.0
    assert t.ratios("ours", "other") == [0.5, 1.0, 3.0]
    assert t.ratio("ours", "other") == 1.0

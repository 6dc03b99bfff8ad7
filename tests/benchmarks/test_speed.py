"""The speed benchmark runs end to end (smoke tests: no timing is asserted, see benchmarks/speed.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
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


def _row(out: str, label: str) -> list[str]:
    row = next(line for line in out.splitlines() if line.startswith(f"| {label}"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_quick_benchmark_prints_every_row(capsys):
    speed = _speed_module()
    speed.main(["--quick", "--repeats", "2", "--no-memory", "--compile", "none", "--only", "train,infer,generate,merged"])
    out = capsys.readouterr().out
    assert "max relative difference" in out  # ours and PEFT's Poly were checked to compute the same logits
    for label in ("train step (mixed)", "inference (mixed)", "generate (mixed)", "inference, 1 merged"):
        cells = _row(out, label)
        assert float(cells[1]) > 0 and cells[-1].endswith("x")  # a time for ours and a ratio against the base
    # the goals, each with its ratio and a verdict
    for goal in ("training step, mixed tasks: ours / base <= 1.12x", "inference, mixed tasks: ours / PEFT Poly <= 0.78x",
                 "greedy generation, mixed tasks: ours / PEFT LoRA <= 1.00x"):
        cells = _row(out, goal)
        assert cells[1].endswith(" met") or cells[1].endswith(" not met")
        assert "[" in cells[1]  # the interquartile range of the per-round ratios


def test_compiled_column_and_many_tasks(capsys):
    """The compiled column compares compiled ours with the compiled base; the 1,000-task rows and the cache report."""
    speed = _speed_module()
    speed.main(["--quick", "--repeats", "1", "--no-memory", "--compile", "aot_eager", "--only", "infer,many"])
    out = capsys.readouterr().out
    cells = _row(out, "inference, mixed tasks: ours / base <= 1.08x")
    assert len(cells) == 3 and cells[2].split()[0].endswith("x")  # eager and compiled, both measured
    cells = _row(out, "1,000 tasks, 32 distinct of 32: training: ours / base <= 1.15x")
    assert all(c.split()[0].endswith("x") for c in cells[1:])
    assert "peft_poly+c: not compiled in --quick" in out  # a column that was not measured says why
    # the eval cache at 1,000 tasks: the prefill mixes once per layer, every decoding step hits
    first = next(line for line in out.splitlines() if "first call:" in line)
    calls, mixes = int(first.split()[2]), int(first.split()[5])
    assert calls > mixes > 0
    again = next(line for line in out.splitlines() if "same tasks again:" in line)
    assert " 0 mixings" in again


def test_task_layout_has_the_requested_number_of_distinct_tasks():
    speed = _speed_module()
    for distinct in (1, 8, 32):
        setup = speed.Setup(n_tasks=1000, batch=32, distinct=distinct)
        ids = speed.task_layout(setup)
        assert ids.shape == (32,) and len(ids.unique()) == distinct and int(ids.max()) < 1000
    assert len(speed.task_layout(speed.Setup()).unique()) == speed.Setup().batch  # default: every example differs
    with pytest.raises(ValueError, match="distinct"):
        speed.task_layout(speed.Setup(n_tasks=10, batch=8, distinct=9))


def test_scaling_writes_every_factor_and_value(tmp_path):
    speed = _speed_module()
    tiny = dataclasses.replace(speed.QUICK, hidden=32, intermediate=64, layers=1, heads=2, vocab=64)
    doc = speed.run_scaling(tiny, str(tmp_path), repeats=1, stem="scaling_test")
    with open(tmp_path / "scaling_test.json") as fh:
        assert json.load(fh) == json.loads(json.dumps(doc))
    assert set(doc["factors"]) == set(speed.SCALING)
    for factor, values in speed.SCALING.items():
        points = doc["factors"][factor]
        assert [p["value"] for p in points] == list(values)
        for p in points:
            for workload in ("train", "infer"):
                assert {"base", "peft_poly", "peft_lora"} <= set(p[workload])
                assert all(p[workload][o]["ratio"] > 0 for o in ("base", "peft_poly", "peft_lora"))
    md = (tmp_path / "scaling_test.md").read_text()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + sum(len(v) for v in speed.SCALING.values())
    assert (tmp_path / "scaling_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timings_ratio_is_the_median_of_per_round_ratios():
    speed = _speed_module()
    t = speed.Timings(ours=[1.0, 2.0, 30.0], other=[2.0, 2.0, 10.0])
    assert t.median("ours") == 2.0
    assert t.ratios("ours", "other") == [0.5, 1.0, 3.0]
    assert t.ratio("ours", "other") == 1.0
    assert t.iqr("ours", "other") == (0.75, 2.0)
    assert speed.Timings(ours=[1.0], other=[2.0]).iqr("ours", "other") is None


def test_floor_report_prints_the_products_share(capsys):
    speed = _speed_module()
    speed.main(["--quick", "--floor", "--repeats", "1"])
    out = capsys.readouterr().out
    h, i, r = speed.QUICK.hidden, speed.QUICK.intermediate, speed.QUICK.r
    # per decoder layer: q, k, v, o (h -> h), gate, up (h -> i), down (i -> h)
    share = r * (4 * 2 * h + 3 * (h + i)) / (4 * h * h + 3 * h * i)
    for label, flops in (("infer, 8 tasks", share), ("train, 8 tasks", 1.5 * share), ("infer, 1,000 tasks", share)):
        cells = _row(out, label)
        assert float(cells[1]) > 0 and float(cells[2]) > 0
        assert float(cells[3].rstrip("x")) > 1.0
        assert float(cells[4]) == pytest.approx(flops, abs=5e-4)
    for workload in ("train", "infer"):  # the fixed cost per layer: a number for ours, inputs kept and PEFT's LoRA
        cells = _row(out, f"{workload} |")
        assert len(cells) == 4 and all(c.lstrip("-").isdigit() for c in cells[1:])


def test_compiled_variants_are_not_run_eagerly_past_dynamo_s_limit():
    """Every compiled model of a run gets its own graph: past dynamo's default limit of 8 it would run eagerly."""
    import torch
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    speed = _speed_module()

    class Scale(torch.nn.Module):
        def __init__(self, k: int) -> None:
            super().__init__()
            self.k = k  # a Python constant: dynamo guards on its value

        def forward(self, x):
            return x * self.k

    default = dynamo_config.recompile_limit
    with speed.allow_recompiles():
        torch._dynamo.reset()
        before = counters["stats"]["unique_graphs"]
        for k in range(10):  # one code object (Scale.forward), ten graphs
            torch.compile(Scale(k), backend="eager")(torch.randn(2))
        assert counters["stats"]["unique_graphs"] - before == 10
    torch._dynamo.reset()
    assert dynamo_config.recompile_limit == default and not dynamo_config.fail_on_recompile_limit_hit  # restored

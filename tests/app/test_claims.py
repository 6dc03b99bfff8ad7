"""app.claims: the statistics and verdicts of the claims, the jobs, and the worker pool."""

from __future__ import annotations

import math

import pytest

from polytropon.app.claims import (
    Job,
    Setup,
    claim_lines,
    collapse_lines,
    collect,
    compare,
    run_jobs,
    stat,
)
from polytropon.app.experiment import Recipe


def test_stat_is_the_mean_and_sample_standard_deviation():
    s = stat([0.70, 0.80, 0.90])
    assert s.mean == pytest.approx(0.80) and s.std == pytest.approx(0.10) and s.n == 3
    assert stat([0.5]).std == 0.0
    assert str(stat([0.70, 0.80, 0.90])) == "0.800 ± 0.100"
    with pytest.raises(ValueError, match="no values"):
        stat([])


def test_compare_holds_only_beyond_the_largest_seed_spread():
    ours = [0.80, 0.82, 0.84]  # mean 0.82, std 0.02
    close = [0.79, 0.80, 0.81]  # mean 0.80, std 0.01: ahead by 0.02, not beyond the spread
    far = [0.70, 0.72, 0.74]  # mean 0.72
    verdict = compare(ours, close)
    assert not verdict.holds and verdict.word == "does not hold at this budget"
    assert verdict.margin == pytest.approx(0.02) and verdict.spread == pytest.approx(0.02)
    assert compare(ours, far).holds and compare(ours, far).word == "holds"
    both = compare(ours, far, close)  # the smallest margin decides
    assert not both.holds and both.margin == pytest.approx(0.02)
    noisy = [0.60, 0.72, 0.84]  # mean 0.72 but std 0.12: the rival's spread counts too
    assert not compare(ours, noisy).holds
    assert not compare(far, ours).holds and compare(far, ours).margin < 0
    with pytest.raises(ValueError, match="rival"):
        compare(ours)


def test_job_kind_is_checked_and_costs_order_the_jobs():
    with pytest.raises(ValueError, match="'nonsense'"):
        Job("nonsense", "mhr", 0)
    long = Job("multitask", "mhr", 0, Recipe(steps=300), (("mhr-z", Recipe()),), few_shot_steps=50)
    short = Job("few-shot", "lora", 0, Recipe(), few_shot_steps=50)
    assert long.cost == 350 and short.cost == 50 and Job("head-only", "head-only", 0).cost == 0


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_run_jobs_refuses_a_bad_worker_count(workers):
    with pytest.raises(ValueError, match="workers"):
        run_jobs(Setup(model_path="unused"), [], workers)


def _record(method, seed, mean, collapsed=(), recovery=None, shots=None):
    record = {"method": method, "seed": seed, "accuracy": {"mean": mean}, "per_task": {"a": mean, "b": mean},
              "collapsed": list(collapsed)}
    if recovery is not None:
        record["recovery"] = {"spearman": recovery, "spearman_chance": 0.0}
    if shots is not None:
        record["shots"] = shots
    return record


def _results():
    results = []
    for seed, (routed, lora, z, new, ft, rec) in enumerate([(0.80, 0.70, 0.66, 0.60, 0.61, 0.50),
                                                            (0.82, 0.71, 0.65, 0.61, 0.60, 0.55),
                                                            (0.81, 0.69, 0.67, 0.59, 0.62, 0.45)]):
        results += [
            {"job": Job("multitask", "mhr", seed), "record": _record("mhr", seed, routed, recovery=rec),
             "few_shot": [_record("mhr-z", seed, z, shots=16)]},
            {"job": Job("multitask", "lora-params", seed), "record": _record("lora-params", seed, lora, ["b"] if seed else []),
             "few_shot": [_record("shared-ft", seed, ft, shots=16)]},
            {"job": Job("few-shot", "lora", seed), "record": _record("lora", seed, new, shots=16), "few_shot": []},
        ]
    return results


def test_claim_lines_give_numbers_and_verdicts():
    records = collect(_results())
    assert [r["method"] for r in records["multitask"]] == ["mhr", "lora-params"] * 3
    assert sorted({r["method"] for r in records["few_shot"]}) == ["lora", "mhr-z", "shared-ft"]
    assert records["tasks"] == ["a", "b"]
    multi, few, recovery = claim_lines(records, "mhr", "lora-params", "mhr-z", 16)
    assert multi["line"].startswith("multi-task accuracy: mhr 0.810 ± 0.010, shared LoRA of the same budget 0.700 ± 0.010")
    assert "-> holds (difference +0.110" in multi["line"] and multi["record"]["holds"]
    assert "few-shot transfer (16 shots per held-out task): mhr-z 0.660 ± 0.010" in few["line"]
    assert few["record"]["margin"] == pytest.approx(0.05) and "-> holds" in few["line"]
    assert recovery["record"]["spearman"] == [0.50, 0.55, 0.45]
    assert "similarity rank correlation 0.500 ± 0.050" in recovery["line"] and "-> holds" in recovery["line"]


def test_collapse_lines_name_the_run_and_its_tasks():
    lines = collapse_lines(collect(_results()), {"lora-params": "lora"})
    assert lines == [f"warning: lora (seed {s}) collapsed on 1 of 2 tasks (every eval example answered the same): b"
                     for s in (1, 2)]


@pytest.fixture(scope="module")
def tiny_setup(tiny_bert):
    return Setup(model_path=tiny_bert, n_train=8, n_eval=4, n_shots=4, n_heldout_eval=4, max_length=16)


def _tiny_jobs():
    recipe = Recipe(steps=3, batch_size=8, n_skills=2, r=2, mhr_splits=2, max_length=16)
    few = Recipe(steps=2, batch_size=8, r=2, max_length=16)
    return [Job("multitask", "mhr", 0, recipe, (("mhr-z", few),), shots=4, few_shot_steps=2),
            Job("few-shot", "lora", 1, few, shots=4, few_shot_steps=2),
            Job("multitask", "lora-params", 1, Recipe(steps=3, batch_size=8, n_skills=2, r=2, max_length=16),
                (("shared-ft", few),), shots=4, few_shot_steps=2),
            Job("head-only", "head-only", 0, recipe)]


def test_the_worker_pool_returns_what_one_process_computes(tiny_setup):
    """Spawned workers (one thread each) give the same records, in the order of the jobs, as this process."""
    jobs = _tiny_jobs()
    seen = []
    pooled = run_jobs(tiny_setup, jobs, 2, on_result=lambda r: seen.append(r["job"]))
    local = run_jobs(tiny_setup, jobs, 1)
    assert sorted(seen, key=jobs.index) == jobs
    assert [r["job"] for r in pooled] == jobs == [r["job"] for r in local]
    for a, b in zip(pooled, local):
        assert a["record"]["per_task"] == b["record"]["per_task"]
        assert a["record"].get("losses") == b["record"].get("losses")
        # the head-only baseline too, though each process starts with its own random torch seed
        assert a["record"].get("eval_loss") == b["record"].get("eval_loss")
        assert [f["per_task"] for f in a["few_shot"]] == [f["per_task"] for f in b["few_shot"]]
    mhr = pooled[0]
    assert len(mhr["record"]["losses"]) == 3 and all(math.isfinite(loss) for loss in mhr["record"]["losses"])
    assert -1.0 <= mhr["record"]["recovery"]["spearman"] <= 1.0
    assert [f["method"] for f in mhr["few_shot"]] == ["mhr-z"] and mhr["few_shot"][0]["shots"] == 4
    assert len(pooled[1]["record"]["per_task"]) == 4  # the held-out tasks

"""benchmarks/recipe_search.py: aggregation over seeds, the selection rule, and resuming from the log."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = importlib.util.spec_from_file_location("recipe_search", os.path.join(ROOT, "benchmarks", "recipe_search.py"))
rs = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(rs)


def record(method, lr, seed, val, collapsed=(), router_lr=0.3, suite_seed=0, spearman=None, stage="lr"):
    return {
        "stage": stage, "method": method, "seed": seed, "suite_seed": suite_seed, "validation_per_task": 40,
        "recipe": {**rs.BUDGET, "lr": lr, "router_lr": router_lr}, "val": {"mean": val},
        "collapsed": list(collapsed),
        "recovery": None if spearman is None else {"spearman": spearman},
    }


def test_summary_mean_std_over_seeds_and_collapsed_counts():
    recs = [record("poly", 1e-2, 0, 0.70, spearman=0.2), record("poly", 1e-2, 1, 0.80, ["xor_a"], spearman=0.4),
            record("poly", 1e-2, 0, 0.10, router_lr=0.1), record("lora-params", 1e-2, 0, 0.60, router_lr=0.1),
            record("lora-params", 1e-2, 1, 0.64)]
    summary = rs.summarise(recs)
    entry = summary[(0, "poly", 1e-2, 0.3)]
    assert entry["seeds"] == [0, 1]
    assert entry["val"]["mean"] == pytest.approx(0.75)
    assert entry["val"]["std"] == pytest.approx(0.0707106781, abs=1e-9)  # sample std (ddof 1)
    assert entry["collapsed"] == [0, 1] and entry["collapsed_tasks"] == ["xor_a"]
    assert entry["spearman"]["mean"] == pytest.approx(0.3)
    # the router lr distinguishes routed configurations, and is ignored for the shared LoRA
    assert summary[(0, "poly", 1e-2, 0.1)]["val"]["std"] == 0.0
    lora = summary[(0, "lora-params", 1e-2, None)]
    assert lora["seeds"] == [0, 1] and "spearman" not in lora


def test_a_configuration_with_a_collapsed_task_is_not_chosen():
    recs = [record("mhr", 2e-2, 0, 0.90, ["t"]), record("mhr", 2e-2, 1, 0.90),
            record("mhr", 1e-2, 0, 0.70), record("mhr", 1e-2, 1, 0.72),
            record("mhr", 5e-3, 0, 0.75), record("mhr", 5e-3, 1, 0.73)]
    ranked = rs.rank_configs(rs.summarise(recs), "mhr")
    assert ranked == [("mhr", 5e-3, 0.3), ("mhr", 1e-2, 0.3), ("mhr", 2e-2, 0.3)]


def test_when_every_configuration_collapses_the_best_accuracy_wins():
    recs = [record("lora-params", 2e-2, 0, 0.60, ["t"]), record("lora-params", 3e-2, 0, 0.65, ["t", "u"])]
    assert rs.rank_configs(rs.summarise(recs), "lora-params")[0] == ("lora-params", 3e-2, None)


def test_ranking_compares_configurations_on_the_same_seeds():
    recs = [record("poly", 1e-2, 0, 0.70), record("poly", 1e-2, 1, 0.70), record("poly", 2e-2, 0, 0.99)]
    assert rs.rank_configs(rs.summarise(recs), "poly", seeds=(0, 1)) == [("poly", 1e-2, 0.3)]


def test_plan_skips_logged_runs_and_picks_top_two_for_confirm(tmp_path):
    log = tmp_path / "log.jsonl"
    assert len(rs.plan("lr", [], 40)) == 2 * sum(len(v) for v in rs.GRID.values())
    grid = []
    for method in rs.METHODS:
        for i, cfg in enumerate(rs.GRID[method]):
            for seed in (0, 1):
                grid.append(record(method, cfg["lr"], seed, 0.5 + 0.01 * i, router_lr=cfg.get("router_lr", 0.3),
                                   collapsed=["t"] if i == len(rs.GRID[method]) - 1 else ()))
    log.write_text("".join(json.dumps(r) + "\n" for r in grid[:5]))
    assert len(rs.plan("lr", rs.read_log(str(log)), 40)) == len(grid) - 5
    assert rs.plan("lr", grid, 40) == []
    confirm = rs.plan("confirm", grid, 40)
    assert {job["seed"] for job in confirm} == {2}
    poly = [(j["recipe"]["lr"], j["recipe"]["router_lr"]) for j in confirm if j["method"] == "poly"]
    # the last grid entry is best by accuracy but collapsed: the two before it are picked
    assert poly == [(c["lr"], c["router_lr"]) for c in (rs.GRID["poly"][-2], rs.GRID["poly"][-3])]
    lora = [j["recipe"] for j in confirm if j["method"] == "lora-params"]
    assert [r["lr"] for r in lora] == [rs.GRID["lora-params"][-2]["lr"], rs.GRID["lora-params"][-3]["lr"]]
    assert all("router_lr" not in r for r in lora)


def test_chosen_configuration_compares_on_common_seeds_and_counts_confirm_collapses():
    recs = [record("poly", 1e-2, 0, 0.80), record("poly", 1e-2, 1, 0.80),
            record("poly", 2e-2, 0, 0.78), record("poly", 2e-2, 1, 0.78),
            record("poly", 5e-3, 0, 0.70), record("poly", 5e-3, 1, 0.70)]
    assert rs.chosen_config(recs, "poly") == (("poly", 1e-2, 0.3), (0, 1))
    # seed 2 of the top two: accuracy there does not re-rank, a collapse there disqualifies
    recs += [record("poly", 1e-2, 2, 0.90, ["t"], stage="confirm"), record("poly", 2e-2, 2, 0.10, stage="confirm")]
    assert rs.chosen_config(recs, "poly") == (("poly", 2e-2, 0.3), (0, 1))
    assert rs.chosen_config(recs, "mhr") is None
    text = rs.format_summary(recs, markdown=True)
    assert "| 0 | poly lr 0.02 router 0.3 | 0,1,2 | 0.553 ± 0.393 |" in text
    assert ("chosen poly: poly lr 0.02 router 0.3, val 0.780 ± 0.000 over seeds 0,1 (0.553 ± 0.393 over seeds 0,1,2)"
            in text)


def test_prune_stops_a_collapsed_configuration_only_while_another_is_clean():
    seed0 = []
    for method in rs.METHODS:
        for cfg in rs.GRID[method]:
            seed0.append(record(method, cfg["lr"], 0, 0.6, router_lr=cfg.get("router_lr", 0.3),
                                collapsed=["t"] if cfg["lr"] >= 1e-2 or method == "mhr" else ()))
    full = rs.plan("lr", seed0, 40)
    pruned = rs.plan("lr", seed0, 40, prune=True)
    assert len(full) == len(seed0)  # seed 1 of everything
    skipped = [j for j in full if j not in pruned]
    # poly and lora-params have clean configurations: their collapsed ones stop; every mhr configuration
    # collapsed, so mhr keeps all of them
    assert {(j["method"], j["recipe"]["lr"]) for j in skipped} == {("poly", 1e-2), ("lora-params", 1e-2),
                                                                  ("lora-params", 2e-2)}
    assert len(skipped) == 4 and all(j["method"] != "mhr" for j in skipped)

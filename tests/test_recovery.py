"""Routing recovery scores (polytropon.recovery): alignment, agreement, similarity correlation, chance level."""

import numpy as np
import pytest

from polytropon.recovery import (
    align_allocation,
    cosine_similarity,
    recovery_scores,
    shuffled_baseline,
    similarity_correlation,
    spearman,
    true_similarity,
)
from polytropon.suite import build_suite

pytest.importorskip("scipy")


@pytest.fixture(scope="module")
def truth():
    return build_suite(seed=0, n_train_per_task=1, n_eval_per_task=1, n_heldout_shots=1,
                       n_heldout_eval_per_task=1).skill_matrix().astype(float)


def test_permuted_allocation_aligns_perfectly(truth):
    rng = np.random.default_rng(0)
    perm = rng.permutation(truth.shape[1])
    learned = (truth / truth.sum(1, keepdims=True))[:, perm]  # skill j of the model is true skill perm[j]
    result = align_allocation(learned, truth)
    assert result.agreement == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(result.aligned, truth / truth.sum(1, keepdims=True), atol=1e-12)
    assert [perm[s] for s in result.match] == list(range(truth.shape[1]))  # match inverts the permutation


def test_extra_learned_skills_and_scaling(truth):
    # 12 learned skills, 8 of them a permutation of the true ones, 4 never used; rows scaled arbitrarily
    rng = np.random.default_rng(1)
    learned = np.zeros((truth.shape[0], 12))
    cols = rng.choice(12, size=8, replace=False)
    learned[:, cols] = truth * rng.uniform(1.0, 1.0001, size=(truth.shape[0], 1))
    scores = recovery_scores(learned * 7.0, truth)
    assert scores.agreement == pytest.approx(1.0, abs=1e-12)
    assert scores.spearman == pytest.approx(1.0, abs=1e-12)


def test_uniform_allocation_scores_the_chance_mass(truth):
    uniform = np.full((truth.shape[0], 8), 1 / 8)
    result = align_allocation(uniform, truth)
    expected = truth.sum(1).mean() / 8  # mass 1/8 on each true skill
    assert result.agreement == pytest.approx(expected, abs=1e-12)


def test_random_allocation_scores_low(truth):
    rng = np.random.default_rng(2)
    agreements, rhos = [], []
    for _ in range(30):
        learned = rng.dirichlet(np.ones(8), size=truth.shape[0])
        scores = recovery_scores(learned, truth)
        agreements.append(scores.agreement)
        rhos.append(scores.spearman)
    assert np.mean(agreements) < 0.45
    assert abs(np.mean(rhos)) < 0.1
    assert max(rhos) < 0.5


def test_per_router_allocations_each_aligned(truth):
    # three routers, each a different permutation of the truth: every one aligns perfectly
    rng = np.random.default_rng(3)
    truth_n = truth / truth.sum(1, keepdims=True)
    mats = [truth_n[:, rng.permutation(8)] for _ in range(3)]
    scores = recovery_scores(mats, truth)
    assert scores.agreement == pytest.approx(1.0, abs=1e-12)
    assert scores.spearman == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(scores.aligned, truth_n, atol=1e-12)


def test_shuffled_baseline_is_far_below_the_truth(truth):
    chance = shuffled_baseline(truth / truth.sum(1, keepdims=True), truth, n_shuffles=30, seed=0)
    assert chance["spearman"] < 0.3
    assert chance["agreement"] < 0.6
    with pytest.raises(ValueError, match="n_shuffles"):
        shuffled_baseline(truth, truth, n_shuffles=0)


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    x = rng.integers(0, 4, size=50).astype(float)
    y = x + rng.normal(size=50)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5)))


def test_similarity_correlation_uses_pairs_only(truth):
    sim = true_similarity(truth)
    np.testing.assert_allclose(np.diag(sim), 1.0)
    assert similarity_correlation(sim, sim) == pytest.approx(1.0)
    assert similarity_correlation(-sim, sim) == pytest.approx(-1.0)
    np.testing.assert_allclose(cosine_similarity(np.zeros((2, 3))), 0.0)


def test_bad_input_is_named(truth):
    with pytest.raises(ValueError, match="rows"):
        align_allocation(np.ones((3, 8)), truth)
    with pytest.raises(ValueError, match="non-negative"):
        align_allocation(-np.ones_like(truth), truth)
    with pytest.raises(ValueError, match="positive sum"):
        align_allocation(np.zeros_like(truth), truth)
    with pytest.raises(ValueError, match="2-D"):
        recovery_scores([np.ones(3)], truth)
    with pytest.raises(ValueError, match="square"):
        similarity_correlation(np.ones((3, 4)), np.ones((3, 4)))

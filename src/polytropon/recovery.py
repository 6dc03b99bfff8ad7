"""Routing recovery: how well a learned task x skill allocation matches a known task x skill structure.

When the true structure of a multi-task suite is known (e.g. :meth:`polytropon.suite.Suite.skill_matrix`,
a binary ``(n_tasks, n_true)`` matrix), a learned allocation can be scored in two ways that do not depend on
how the learned skills happen to be numbered:

* **Similarity correlation** (:func:`similarity_correlation`): the Spearman rank correlation, over all task
  pairs ``i < j``, between the learned task x task similarity and the true one. The true similarity is the
  cosine of the rows of the true matrix; the learned one is the cosine of the tasks' routing vectors (e.g.
  :func:`polytropon.analysis.task_similarity`). 1 means the learned routing orders task pairs exactly as
  the true structure does; 0 is no relation.
* **Aligned agreement** (:func:`align_allocation`): learned skills are matched one-to-one to true skills by
  the optimal assignment (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``) that maximises
  ``sum_t sum_s L[t, s] * T[t, pi(s)]``, where ``L`` is the learned allocation (rows sum to 1) and ``T`` the
  true matrix with rows normalised to sum to 1. The aligned allocation ``L_pi`` has one column per true
  skill (learned skills left unmatched are dropped). The agreement is the mean over tasks of the routing
  mass on the task's true skills, ``mean_t sum_{s in true(t)} L_pi[t, s]``: 1 when every task puts all its
  weight on (the matches of) its true skills, about ``mean_t |true(t)| / n_skills`` for uniform routing.
  The matching is chosen to make this score large, so a random allocation scores above uniform routing;
  :func:`shuffled_baseline` measures that chance level by shuffling the tasks of the learned allocation.

An adapter usually has several routers (one per adapted layer, and one allocation per MHR split), each with
its own, independently numbered skills. :func:`recovery_scores` therefore concatenates the routers'
allocations for the similarity (as :func:`polytropon.analysis.task_similarity` does) and aligns every
router's allocation separately, averaging the agreements and the aligned matrices.

All functions take plain NumPy arrays (or anything ``np.asarray`` accepts, e.g. CPU tensors). The alignment
needs scipy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "true_similarity",
    "cosine_similarity",
    "spearman",
    "similarity_correlation",
    "align_allocation",
    "Alignment",
    "RecoveryScores",
    "recovery_scores",
    "shuffled_baseline",
]


def _matrix(value, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n_tasks, n) matrix, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds non-finite values")
    return array


def cosine_similarity(features) -> np.ndarray:
    """``S[i, j] = <f_i, f_j> / (|f_i| |f_j|)`` for the rows ``f_i`` of a ``(n_tasks, d)`` matrix.

    A zero row has similarity 0 with every row (itself included).
    """
    f = _matrix(features, "features")
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    unit = np.divide(f, norms, out=np.zeros_like(f), where=norms > 0)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def true_similarity(skill_matrix) -> np.ndarray:
    """The true task x task similarity: cosine of the rows of a ``(n_tasks, n_true)`` skill matrix."""
    return cosine_similarity(skill_matrix)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array; ties get the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation of two equally long 1-D sequences (Pearson correlation of tie-averaged ranks).

    Returns ``nan`` when either sequence is constant (the correlation is undefined).
    """
    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"spearman needs two sequences of equal length >= 2, got {a.size} and {b.size}")
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def similarity_correlation(learned_similarity, true_sim) -> float:
    """Spearman correlation between two ``(n_tasks, n_tasks)`` similarity matrices over the pairs ``i < j``.

    Values are rounded to 10 decimals first, so that similarities equal up to round-off count as ties.
    """
    a, b = _matrix(learned_similarity, "learned_similarity"), _matrix(true_sim, "true_similarity")
    if a.shape != b.shape or a.shape[0] != a.shape[1]:
        raise ValueError(f"similarity matrices must be square and equally shaped, got {a.shape} and {b.shape}")
    iu = np.triu_indices(a.shape[0], k=1)
    # similarities equal up to float round-off are ties (cosines of equal patterns computed from scaled rows)
    return spearman(np.round(a[iu], 10), np.round(b[iu], 10))


@dataclass
class Alignment:
    """A learned allocation aligned to the true skills.

    Attributes:
        aligned: ``(n_tasks, n_true)``; column ``k`` is the learned skill matched to true skill ``k`` (zeros
            when no learned skill is matched to it, i.e. when there are fewer learned than true skills).
        match: ``match[k]`` is the learned skill matched to true skill ``k``, or ``-1``.
        agreement: mean over tasks of ``sum_{k in true(t)} aligned[t, k]`` (routing mass on the true skills).
    """

    aligned: np.ndarray
    match: list[int]
    agreement: float


def _normalise_rows(m: np.ndarray, name: str) -> np.ndarray:
    if np.any(m < 0):
        raise ValueError(f"{name} must be non-negative")
    sums = m.sum(axis=1, keepdims=True)
    if np.any(sums <= 0):
        raise ValueError(f"every row of {name} needs a positive sum")
    return m / sums


def align_allocation(learned, skill_matrix) -> Alignment:
    """Match learned skills to true skills one-to-one and score the match (see the module docstring).

    Args:
        learned: ``(n_tasks, n_skills)`` non-negative learned allocation; rows are normalised to sum to 1.
        skill_matrix: ``(n_tasks, n_true)`` non-negative true structure (binary for the built-in suite);
            rows are normalised to sum to 1 for the matching, and its non-zero entries are a task's true skills.

    Raises:
        ValueError: shapes that do not fit, negative entries, or a row with zero sum.
        ImportError: scipy is not installed.
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - optional dependency
        raise ImportError("align_allocation needs scipy: pip install scipy") from None
    lm, tm = _matrix(learned, "learned"), _matrix(skill_matrix, "skill_matrix")
    if lm.shape[0] != tm.shape[0]:
        raise ValueError(f"learned has {lm.shape[0]} tasks (rows) but skill_matrix has {tm.shape[0]}")
    lm, tn = _normalise_rows(lm, "learned"), _normalise_rows(tm, "skill_matrix")
    gain = lm.T @ tn  # (n_skills, n_true): how much learned skill s serves true skill k
    rows, cols = linear_sum_assignment(gain, maximize=True)
    match = [-1] * tm.shape[1]
    aligned = np.zeros((lm.shape[0], tm.shape[1]))
    for s, k in zip(rows, cols):
        match[k] = int(s)
        aligned[:, k] = lm[:, s]
    agreement = float(((tm > 0) * aligned).sum(axis=1).mean())
    return Alignment(aligned, match, agreement)


@dataclass
class RecoveryScores:
    """Recovery of the true structure by a learned routing (see :func:`recovery_scores`).

    Attributes:
        spearman: similarity correlation of the concatenated routing.
        agreement: aligned agreement, averaged over the allocations (routers x splits).
        aligned: ``(n_tasks, n_true)`` mean of the per-allocation aligned matrices (for a heatmap).
    """

    spearman: float
    agreement: float
    aligned: np.ndarray


def _allocations(allocations) -> list[np.ndarray]:
    if isinstance(allocations, np.ndarray) and allocations.ndim == 2:
        allocations = [allocations]
    out = [_matrix(a, "allocation") for a in allocations]
    if not out:
        raise ValueError("no allocation given")
    if len({a.shape[0] for a in out}) != 1:
        raise ValueError(f"allocations disagree on the number of tasks: {[a.shape for a in out]}")
    return out


def recovery_scores(allocations: Sequence | np.ndarray, skill_matrix) -> RecoveryScores:
    """Both recovery scores of one routing given as a list of ``(n_tasks, n_skills)`` allocations.

    ``allocations`` holds one matrix per router and split (each row summing to 1, e.g. from
    :attr:`polytropon.analysis.RoutingSnapshot.per_router`), or a single matrix. The similarity uses the
    concatenation of all of them (``n_tasks x sum of widths``); the agreement and the aligned matrix are the
    means over the per-allocation alignments.
    """
    mats = _allocations(allocations)
    tm = _matrix(skill_matrix, "skill_matrix")
    features = np.concatenate(mats, axis=1)
    rho = similarity_correlation(cosine_similarity(features), true_similarity(tm))
    alignments = [align_allocation(m, tm) for m in mats]
    return RecoveryScores(
        spearman=rho,
        agreement=float(np.mean([a.agreement for a in alignments])),
        aligned=np.mean([a.aligned for a in alignments], axis=0),
    )


def shuffled_baseline(
    allocations: Sequence | np.ndarray, skill_matrix, n_shuffles: int = 20, seed: int = 0
) -> dict[str, float]:
    """Chance level of :func:`recovery_scores`: the same allocations with their tasks (rows) shuffled.

    One random permutation of the tasks is applied to every allocation at once (so a task keeps its routing
    across layers, but it is another task's routing), ``n_shuffles`` times.

    Returns:
        ``{"spearman": mean, "spearman_std": std, "agreement": mean, "agreement_std": std}`` over the
        shuffles (a constant similarity gives a ``nan`` correlation, left out of the mean).
    """
    if isinstance(n_shuffles, bool) or not isinstance(n_shuffles, int) or n_shuffles <= 0:
        raise ValueError(f"n_shuffles must be a positive int, got {n_shuffles!r}")
    mats = _allocations(allocations)
    rng = np.random.default_rng(seed)
    rhos, agreements = [], []
    for _ in range(n_shuffles):
        perm = rng.permutation(mats[0].shape[0])
        scores = recovery_scores([m[perm] for m in mats], skill_matrix)
        rhos.append(scores.spearman)
        agreements.append(scores.agreement)
    rhos_arr = np.array([r for r in rhos if np.isfinite(r)])
    return {
        "spearman": float(rhos_arr.mean()) if rhos_arr.size else float("nan"),
        "spearman_std": float(rhos_arr.std()) if rhos_arr.size else float("nan"),
        "agreement": float(np.mean(agreements)),
        "agreement_std": float(np.std(agreements)),
    }

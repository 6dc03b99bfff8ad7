"""Tests of the built-in task suite."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from polytropon.app.suite import HELDOUT_TASKS, SKILLS, TRAIN_TASKS, TaskSpec, build_suite

# An independent reading of the attributes from the surface text, written
# without the generator's word lists, so the test can disagree with it.
_ANIMAL = re.compile(r"\b(dogs?|cats?|horses?|fox(es)?|rabbits?|goats?|wol(f|ves)|parrots?|mouse|mice|donkeys?)\b")
_PLURAL_SUBJECT = re.compile(
    r"\b(dogs|cats|horses|foxes|rabbits|goats|wolves|parrots|mice|donkeys|farmers|teachers|doctors|sailors|"
    r"bakers|students|painters|nurses|children|women)\b"
)
_NEGATION = re.compile(r"\b(not|n't)\b|n't\b")
_POSITIVE = re.compile(r"\b(lov|enjoy|lik|admir|ador|prais|welcom)")
_NEGATIVE = re.compile(r"\b(hat|dislik|fear|avoid|resent|dread|despis)")
_OUTDOORS = re.compile(r"(garden|river|forest|beach|field|hill|park)")
_NIGHT = re.compile(r"(night|midnight|after dark|before dawn)")
_FOOD = re.compile(r"\b(soup|bread|apples|cheese|cake|rice|pears|noodles|carrots|honey)\b")


def read_attributes(sentence: str) -> dict[str, bool]:
    s = sentence.lower()
    negated = bool(_NEGATION.search(s))
    past = bool(re.search(r"\bdid(n't| not)\b", s)) or (
        not negated and bool(re.search(r"\b(loved|enjoyed|liked|admired|adored|praised|welcomed|hated|disliked|feared|avoided|resented|dreaded|despised)\b", s))
    )
    positive = bool(_POSITIVE.search(s))
    assert positive != bool(_NEGATIVE.search(s)), sentence
    return {
        "animal": bool(_ANIMAL.search(s)),
        "plural": bool(_PLURAL_SUBJECT.search(s)),
        "past": past,
        "negated": negated,
        "positive": positive,
        "outdoors": bool(_OUTDOORS.search(s)),
        "night": bool(_NIGHT.search(s)),
        "food": bool(_FOOD.search(s)),
    }


@pytest.fixture(scope="module")
def suite():
    return build_suite(seed=3, n_train_per_task=24, n_eval_per_task=10, n_heldout_shots=4, n_heldout_eval_per_task=10)


def test_deterministic_for_a_seed(suite):
    again = build_suite(seed=3, n_train_per_task=24, n_eval_per_task=10, n_heldout_shots=4, n_heldout_eval_per_task=10)
    for split in ("train", "eval", "heldout_train", "heldout_eval"):
        assert suite.rows(split) == again.rows(split)
    other = build_suite(seed=4, n_train_per_task=24, n_eval_per_task=10, n_heldout_shots=4, n_heldout_eval_per_task=10)
    assert suite.rows("train") != other.rows("train")


def test_sizes_and_balance(suite):
    for split, tasks, n in (
        ("train", TRAIN_TASKS, 24),
        ("eval", TRAIN_TASKS, 10),
        ("heldout_train", HELDOUT_TASKS, 4),
        ("heldout_eval", HELDOUT_TASKS, 10),
    ):
        counts = Counter((r["task"], r["target"]) for r in suite.rows(split))
        for task in tasks:
            assert counts[(task.name, "yes")] == n // 2 + n % 2
            assert counts[(task.name, "no")] == n // 2


def test_splits_share_no_sentence(suite):
    seen: set[str] = set()
    for split in ("train", "eval", "heldout_train", "heldout_eval"):
        sentences = {e.sentence for e in suite.examples(split)}
        assert len(sentences) == len(suite.examples(split))
        assert not sentences & seen
        seen |= sentences


def test_labels_follow_the_attribute_logic(suite):
    ops = {"single": lambda v: v[0], "and": lambda v: v[0] and v[1], "or": lambda v: v[0] or v[1],
           "xor": lambda v: v[0] != v[1]}
    by_name = {t.name: t for t in TRAIN_TASKS + HELDOUT_TASKS}
    for split in ("train", "eval", "heldout_train", "heldout_eval"):
        for ex in suite.examples(split):
            attrs = read_attributes(ex.sentence)
            assert attrs == ex.attributes, ex.sentence
            task = by_name[ex.task]
            truth = ops[task.op]([attrs[s] for s in task.skills])
            assert ex.target == ("yes" if truth else "no"), (ex.task, ex.sentence)
            assert ex.input.endswith(ex.sentence) and ex.input.startswith(task.question)


def test_skill_matrix(suite):
    m = suite.skill_matrix()
    assert m.shape == (len(TRAIN_TASKS), len(SKILLS))
    assert 16 <= m.shape[0] <= 24
    assert set(np.unique(m)) == {0, 1}
    # singles read one skill, pairs two; every skill is used by some training task
    assert sorted(set(m.sum(1).tolist())) == [1, 2]
    assert (m.sum(0) > 0).all()
    row = suite.task_names.index("positive_or_negated")
    assert m[row, SKILLS.index("positive")] == 1 and m[row, SKILLS.index("negated")] == 1 and m[row].sum() == 2
    h = suite.skill_matrix(heldout=True)
    assert h.shape == (len(HELDOUT_TASKS), len(SKILLS))
    # held-out tasks recombine skills seen in training, but are new combinations
    train_pairs = {frozenset(t.skills) for t in TRAIN_TASKS}
    assert {t.op for t in HELDOUT_TASKS} == {"and"}  # xor pairs stay at chance at the project's budgets
    for t in HELDOUT_TASKS:
        assert frozenset(t.skills) not in train_pairs
        assert all(m[:, SKILLS.index(s)].any() for s in t.skills)


def test_task_names_unique_and_questions_distinct():
    names = [t.name for t in TRAIN_TASKS + HELDOUT_TASKS]
    assert len(names) == len(set(names))
    assert len({t.question for t in TRAIN_TASKS + HELDOUT_TASKS}) == len(names)


def test_invalid_task_spec_rejected():
    with pytest.raises(ValueError):
        TaskSpec("bad", ("animal",), "and")
    with pytest.raises(ValueError):
        TaskSpec("bad", ("colour",), "single")
    with pytest.raises(ValueError):
        build_suite(n_train_per_task=-1)


def test_questions_and_descriptions():
    by_name = {t.name: t for t in TRAIN_TASKS}
    assert by_name["animal_and_night"].question == "animal and night?"
    assert by_name["positive_or_negated"].description.startswith("Is at least one true")
    assert TaskSpec("a_xor_b", ("animal", "plural"), "xor").description.startswith("Is exactly one true")
    assert {t.op for t in TRAIN_TASKS} == {"single", "and", "or"}
    assert by_name["food"].description == "Is it true that the object is food?"

"""A built-in multi-task suite whose task -> skill structure is known.

Sentences are generated from a small seeded grammar. Every sentence has eight
binary latent attributes (the *skills*): whether the subject is an animal, whether
it is plural, the tense, negation, the sentiment of the verb, the place, the time
of day and the kind of object. Each task is a yes/no question about one attribute
or about two attributes combined with ``and`` / ``or`` (``xor`` is available too), so the true
task x skill matrix is known exactly. A few held-out tasks recombine skills that
were seen during training, for few-shot adaptation experiments.

Example::

    >>> from polytropon.app.suite import build_suite
    >>> suite = build_suite(seed=0)
    >>> suite.skill_matrix().shape
    (20, 8)
    >>> suite.rows("train")[0].keys()
    dict_keys(['task', 'input', 'target'])

Everything is a pure function of the seed and the sizes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = [
    "SKILLS",
    "SKILL_STATEMENTS",
    "TaskSpec",
    "Example",
    "Suite",
    "build_suite",
    "realize",
    "TRAIN_TASKS",
    "HELDOUT_TASKS",
]

#: Latent binary attributes of a sentence; the skills of the suite.
SKILLS: tuple[str, ...] = (
    "animal",  # the subject is an animal (otherwise a person)
    "plural",  # the subject is plural
    "past",  # past tense (otherwise present)
    "negated",  # the verb is negated
    "positive",  # the verb expresses liking (otherwise dislike)
    "outdoors",  # the place is outdoors (otherwise indoors)
    "night",  # the time is at night (otherwise during the day)
    "food",  # the object is food (otherwise an artifact)
)

#: How each attribute is phrased inside a question.
SKILL_STATEMENTS: dict[str, str] = {
    "animal": "the subject is an animal",
    "plural": "the subject is plural",
    "past": "the sentence is in the past tense",
    "negated": "the verb is negated",
    "positive": "the verb expresses liking",
    "outdoors": "the place is outdoors",
    "night": "it happens at night",
    "food": "the object is food",
}

Op = Literal["single", "and", "or", "xor"]


@dataclass(frozen=True)
class TaskSpec:
    """A yes/no question about one attribute or a pair of attributes."""

    name: str
    skills: tuple[str, ...]
    op: Op

    def __post_init__(self) -> None:
        expected = 1 if self.op == "single" else 2
        if len(self.skills) != expected:
            raise ValueError(f"task {self.name!r}: op {self.op!r} needs {expected} skill(s)")
        unknown = [s for s in self.skills if s not in SKILLS]
        if unknown:
            raise ValueError(f"task {self.name!r}: unknown skill(s) {unknown}")

    @property
    def question(self) -> str:
        """The short question prepended to each sentence, e.g. ``"animal and night?"``.

        It is kept terse so the demo's sequences stay short; :attr:`description` spells it out.
        """
        if self.op == "single":
            return f"{self.skills[0]}?"
        return f"{self.skills[0]} {self.op} {self.skills[1]}?"

    @property
    def description(self) -> str:
        """The question in plain English."""
        statements = [SKILL_STATEMENTS[s] for s in self.skills]
        if self.op == "single":
            return f"Is it true that {statements[0]}?"
        if self.op == "and":
            return f"Are both true: {statements[0]}; {statements[1]}?"
        if self.op == "or":
            return f"Is at least one true: {statements[0]}; {statements[1]}?"
        return f"Is exactly one true: {statements[0]}; {statements[1]}?"

    def answer(self, attributes: dict[str, bool]) -> bool:
        """The ground-truth answer for a sentence with the given attributes."""
        values = [attributes[s] for s in self.skills]
        if self.op == "single":
            return values[0]
        if self.op == "and":
            return values[0] and values[1]
        if self.op == "or":
            return values[0] or values[1]
        return values[0] != values[1]


def _task(a: str, op: Op = "single", b: str | None = None) -> TaskSpec:
    if op == "single":
        return TaskSpec(a, (a,), "single")
    assert b is not None
    return TaskSpec(f"{a}_{op}_{b}", (a, b), op)


#: The 20 training tasks: every attribute alone plus twelve pairs (seven ``and``, five ``or``). The ``or`` tasks
#: were ``xor`` tasks on the same pairs until every method at every budget tried had left all five at chance
#: (docs/RESULTS.md, "The suite's tasks").
TRAIN_TASKS: tuple[TaskSpec, ...] = tuple(_task(s) for s in SKILLS) + (
    _task("positive", "or", "negated"),
    _task("animal", "and", "night"),
    _task("plural", "and", "past"),
    _task("outdoors", "and", "food"),
    _task("animal", "or", "plural"),
    _task("past", "and", "negated"),
    _task("night", "or", "outdoors"),
    _task("food", "and", "positive"),
    _task("animal", "and", "outdoors"),
    _task("plural", "or", "night"),
    _task("past", "or", "food"),
    _task("negated", "and", "outdoors"),
)

#: Held-out tasks: new pairs of skills that all occur in training tasks. All four are ``and`` pairs: ``xor``
#: pairs stay at chance for every method at the project's budgets, so a held-out ``xor`` task measures nothing.
HELDOUT_TASKS: tuple[TaskSpec, ...] = (
    _task("animal", "and", "positive"),
    _task("plural", "and", "food"),
    _task("past", "and", "night"),
    _task("negated", "and", "animal"),
)

# --------------------------------------------------------------------------- grammar

_PERSONS = (
    ("farmer", "farmers"),
    ("teacher", "teachers"),
    ("doctor", "doctors"),
    ("sailor", "sailors"),
    ("baker", "bakers"),
    ("student", "students"),
    ("painter", "painters"),
    ("nurse", "nurses"),
    ("child", "children"),
    ("woman", "women"),
)
_ANIMALS = (
    ("dog", "dogs"),
    ("cat", "cats"),
    ("horse", "horses"),
    ("fox", "foxes"),
    ("rabbit", "rabbits"),
    ("goat", "goats"),
    ("wolf", "wolves"),
    ("parrot", "parrots"),
    ("mouse", "mice"),
    ("donkey", "donkeys"),
)
_ADJECTIVES = ("old", "young", "tall", "small", "quiet", "busy", "brown", "local", "clever", "lazy")
_DETERMINERS_SINGULAR = ("the", "my", "our", "that", "this", "their")
_DETERMINERS_PLURAL = ("the", "my", "our", "those", "these", "some", "two", "three")
# (base form, past form); the present third person singular is base + "s".
_POSITIVE_VERBS = (
    ("love", "loved"),
    ("enjoy", "enjoyed"),
    ("like", "liked"),
    ("admire", "admired"),
    ("adore", "adored"),
    ("praise", "praised"),
    ("welcome", "welcomed"),
)
_NEGATIVE_VERBS = (
    ("hate", "hated"),
    ("dislike", "disliked"),
    ("fear", "feared"),
    ("avoid", "avoided"),
    ("resent", "resented"),
    ("dread", "dreaded"),
    ("despise", "despised"),
)
_FOODS = ("soup", "bread", "apples", "cheese", "cake", "rice", "pears", "noodles", "carrots", "honey")
_ARTIFACTS = ("radio", "lamp", "bicycle", "painting", "piano", "boat", "clock", "chair", "kettle", "mirror")
_OBJECT_DETERMINERS = ("the", "my", "her", "his", "their", "the new", "the old")
_INDOORS = ("in the kitchen", "in the library", "at the office", "in the hall", "in the museum", "in the attic", "in the classroom")
_OUTDOORS = ("in the garden", "by the river", "in the forest", "on the beach", "in the field", "on the hill", "in the park")
_DAY = ("in the morning", "at noon", "in the afternoon", "during the day", "after breakfast")
_NIGHT = ("at night", "at midnight", "late at night", "after dark", "before dawn")


def _verb_phrase(attrs: dict[str, bool], rng: random.Random) -> str:
    base, past = rng.choice(_POSITIVE_VERBS if attrs["positive"] else _NEGATIVE_VERBS)
    singular = not attrs["plural"]
    if attrs["negated"]:
        if attrs["past"]:
            aux = rng.choice(("did not", "didn't"))
        elif singular:
            aux = rng.choice(("does not", "doesn't"))
        else:
            aux = rng.choice(("do not", "don't"))
        return f"{aux} {base}"
    if attrs["past"]:
        return past
    return base + "s" if singular else base


def realize(attrs: dict[str, bool], rng: random.Random) -> str:
    """Render one English sentence with the given latent attributes.

    Surface choices (nouns, adjectives, determiners, word order) are drawn from
    ``rng``; the attributes alone decide every task's answer.
    """
    noun = rng.choice(_ANIMALS if attrs["animal"] else _PERSONS)[1 if attrs["plural"] else 0]
    det = rng.choice(_DETERMINERS_PLURAL if attrs["plural"] else _DETERMINERS_SINGULAR)
    subject = f"{det} {rng.choice(_ADJECTIVES)} {noun}" if rng.random() < 0.5 else f"{det} {noun}"
    obj = f"{rng.choice(_OBJECT_DETERMINERS)} {rng.choice(_FOODS if attrs['food'] else _ARTIFACTS)}"
    place = rng.choice(_OUTDOORS if attrs["outdoors"] else _INDOORS)
    time = rng.choice(_NIGHT if attrs["night"] else _DAY)
    verb = _verb_phrase(attrs, rng)
    layout = rng.randrange(3)
    if layout == 0:
        words = f"{subject} {verb} {obj} {place} {time}"
    elif layout == 1:
        words = f"{subject} {verb} {obj} {time} {place}"
    else:
        words = f"{time}, {subject} {verb} {obj} {place}"
    return words[0].upper() + words[1:] + "."


# --------------------------------------------------------------------------- suite


@dataclass(frozen=True)
class Example:
    """One generated example together with the latent attributes of its sentence."""

    task: str
    sentence: str
    question: str
    target: str
    attributes: dict[str, bool] = field(compare=False)

    @property
    def input(self) -> str:
        return f"{self.question} {self.sentence}"

    def to_row(self) -> dict[str, str]:
        """The ``{"task", "input", "target"}`` row used by the CLI and JSONL files."""
        return {"task": self.task, "input": self.input, "target": self.target}


Split = Literal["train", "eval", "heldout_train", "heldout_eval", "heldout_validation"]


@dataclass(frozen=True)
class Suite:
    """The generated suite: tasks, skills, and examples for each split."""

    seed: int
    skills: tuple[str, ...]
    tasks: tuple[TaskSpec, ...]
    heldout_tasks: tuple[TaskSpec, ...]
    splits: dict[str, list[Example]]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def heldout_task_names(self) -> list[str]:
        return [t.name for t in self.heldout_tasks]

    def skill_matrix(self, heldout: bool = False) -> np.ndarray:
        """Binary ``(n_tasks, n_skills)`` matrix: entry 1 iff the task reads that skill."""
        tasks = self.heldout_tasks if heldout else self.tasks
        matrix = np.zeros((len(tasks), len(self.skills)), dtype=np.int64)
        for i, task in enumerate(tasks):
            for skill in task.skills:
                matrix[i, self.skills.index(skill)] = 1
        return matrix

    def examples(self, split: Split) -> list[Example]:
        return self.splits[split]

    def rows(self, split: Split) -> list[dict[str, str]]:
        """The split as ``{"task", "input", "target"}`` dicts."""
        return [e.to_row() for e in self.splits[split]]


def _sample_attrs(rng: random.Random) -> dict[str, bool]:
    return {s: rng.random() < 0.5 for s in SKILLS}


def _generate(
    tasks: tuple[TaskSpec, ...],
    n_per_task: int,
    rng: random.Random,
    seen: set[str],
) -> list[Example]:
    """``n_per_task`` examples per task, labels alternating yes/no, sentences unseen so far."""
    out: list[Example] = []
    for task in tasks:
        for i in range(n_per_task):
            want = i % 2 == 0
            while True:
                attrs = _sample_attrs(rng)
                if task.answer(attrs) != want:
                    continue
                sentence = realize(attrs, rng)
                if sentence not in seen:
                    break
            seen.add(sentence)
            out.append(Example(task.name, sentence, task.question, "yes" if want else "no", attrs))
    rng.shuffle(out)
    return out


def build_suite(
    seed: int = 0,
    n_train_per_task: int = 96,
    n_eval_per_task: int = 50,
    n_heldout_shots: int = 16,
    n_heldout_eval_per_task: int = 50,
    n_heldout_validation_per_task: int = 0,
) -> Suite:
    """Generate the suite deterministically from ``seed``.

    Labels are balanced per task (the counts are rounded so that ``yes`` gets the
    extra example when ``n`` is odd). No sentence appears in two splits. The
    ``heldout_validation`` split (for choosing few-shot recipes without reading ``heldout_eval``) is
    generated last, so asking for it leaves every other split unchanged.
    """
    for name, n in {
        "n_train_per_task": n_train_per_task,
        "n_eval_per_task": n_eval_per_task,
        "n_heldout_shots": n_heldout_shots,
        "n_heldout_eval_per_task": n_heldout_eval_per_task,
        "n_heldout_validation_per_task": n_heldout_validation_per_task,
    }.items():
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    splits = {
        "train": _generate(TRAIN_TASKS, n_train_per_task, rng, seen),
        "eval": _generate(TRAIN_TASKS, n_eval_per_task, rng, seen),
        "heldout_train": _generate(HELDOUT_TASKS, n_heldout_shots, rng, seen),
        "heldout_eval": _generate(HELDOUT_TASKS, n_heldout_eval_per_task, rng, seen),
    }
    splits["heldout_validation"] = _generate(HELDOUT_TASKS, n_heldout_validation_per_task, rng, seen)
    return Suite(seed=seed, skills=SKILLS, tasks=TRAIN_TASKS, heldout_tasks=HELDOUT_TASKS, splits=splits)

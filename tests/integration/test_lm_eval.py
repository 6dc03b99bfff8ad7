"""lm-evaluation-harness (``lm_eval``) on a Poly model, offline: a local YAML task over a local JSONL file.

* ``HFLM(pretrained=<PolyModel>)`` evaluated inside ``model.task_context(task)``: the harness's loglikelihoods are
  the Poly model's own for that task (one task per run).
* ``HFLM(pretrained=<base path>, peft=<Poly adapter>)`` loads the adapter with PEFT's Poly, whose router then gets
  no task ids: the run fails (PEFT: "task_ids should not be None.").
* ``HFLM(pretrained=<base path>, peft=<a task exported as LoRA>)`` gives that task's loglikelihoods.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from tests.helpers import SMALL_VOCAB as VOCAB

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("peft")

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

TASK = "poly_tiny_choice"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 64 ids: ``<pad> <s> </s> <unk> w0 .. w59``, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture
def task_dir(tmp_path):
    """A multiple-choice task: a context of three words, two continuations (one or two words) per document."""
    rows = [{"context": f"w{i} w{i + 1} w{i + 2}", "choices": [f"w{i + 5}", f"w{i + 9} w{i + 1}"], "label": 0}
            for i in range(5)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tmp_path


def harness_loglikelihoods(lm, task_dir) -> dict[tuple[str, str], float]:
    """``(context, continuation) -> loglikelihood`` of every request of the task, as lm_eval computed them."""
    results = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)),
                                      log_samples=True)
    out = {}
    for sample in results["samples"][TASK]:
        for (context, continuation), [(loglikelihood, _)] in zip(sample["arguments"], sample["resps"]):
            out[(context, continuation)] = loglikelihood
    return out


def own_loglikelihood(model, tokenizer, context: str, continuation: str, **call) -> float:
    """``sum_i log p(continuation_i | context, continuation_<i)`` from one forward of ``model``."""
    ctx, cont = tokenizer(context).input_ids, tokenizer(continuation).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1], **call).logits.double()
    logprobs = torch.log_softmax(logits[0, len(ctx) - 1:], dim=-1)
    return float(logprobs.gather(1, torch.tensor(cont)[:, None]).sum())


@pytest.mark.parametrize("kind", ["poly", "mhr"])
def test_hflm_on_the_poly_model_inside_task_context(task_dir, kind, poly_model):
    model = poly_model("llama-linear", kind, n_tasks=3)
    tokenizer = tiny_tokenizer()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    per_task = []
    for task in (1, 2):
        with model.task_context(task):
            got = harness_loglikelihoods(lm, task_dir)
        assert len(got) == 10
        for (context, continuation), value in got.items():
            expected = own_loglikelihood(model, tokenizer, context, continuation, task_ids=[task])
            assert value == pytest.approx(expected, rel=1e-5, abs=1e-5)
        per_task.append(got)
    assert max(abs(per_task[0][k] - per_task[1][k]) for k in per_task[0]) > 1e-3  # the task changes the answer
    # outside a task context the harness's first call gets the model's own error
    with pytest.raises(ValueError, match="task_ids are required while adapter 'default' is active"):
        harness_loglikelihoods(lm, task_dir)


@pytest.fixture
def base_dir(tmp_path, small_llama):
    """The base model and tokenizer saved locally, for the harness's ``pretrained=<path>`` (and ``peft=``) route."""
    path = tmp_path / "base"
    small_llama(0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_hflm_peft_route_with_a_poly_adapter_fails_without_task_ids(task_dir, base_dir, tmp_path, poly_model):
    model = poly_model("llama-linear", "poly")
    model.save_pretrained(tmp_path / "poly")
    lm = HFLM(pretrained=str(base_dir), peft=str(tmp_path / "poly"), device="cpu", batch_size=2)
    assert type(lm.model).__module__.startswith("peft")  # loaded by PEFT as its Poly model
    with pytest.raises(ValueError, match="task_ids should not be None"):
        harness_loglikelihoods(lm, task_dir)


@pytest.mark.parametrize("kind", ["poly", "mhr"])
def test_hflm_peft_route_with_a_task_exported_as_lora(task_dir, base_dir, tmp_path, kind, poly_model):
    model = poly_model("llama-linear", kind)
    tokenizer = tiny_tokenizer()
    manifest = model.export_lora_all(tmp_path / "loras")
    entry = manifest["adapters"][2]
    lm = HFLM(pretrained=str(base_dir), peft=entry["path"], device="cpu", batch_size=2)
    got = harness_loglikelihoods(lm, task_dir)
    for (context, continuation), value in got.items():
        expected = own_loglikelihood(model, tokenizer, context, continuation, task_ids=[entry["task_id"]])
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert os.path.isdir(entry["path"])

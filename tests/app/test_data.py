"""JSONL loading, the task_ids collator, and the HF Trainer keeping task_ids for a PolyModel."""

from __future__ import annotations

import json

import pytest
import torch

from polytropon.app.data import (
    DataError,
    PolyDataCollator,
    PolyDataset,
    Row,
    check_tasks,
    encode_rows,
    load_jsonl,
    split_rows,
    task_names_of,
)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_load_jsonl_reads_rows_and_skips_blank_lines(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        [json.dumps({"task": "a", "input": "x", "target": "yes", "extra": 1}), "", json.dumps({"task": "b", "input": "y", "target": "no"})],
    )
    rows = load_jsonl(path)
    assert [(r.task, r.input, r.target, r.line) for r in rows] == [("a", "x", "yes", 1), ("b", "y", "no", 3)]
    assert task_names_of(rows) == ["a", "b"]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"task": "a", "input": "x"', "not valid JSON"),
        ('{"task": "a", "input": "x"}', "missing key(s) target"),
        ('{"task": "a", "input": 3, "target": "no"}', "'input' must be a string"),
        ("[1, 2]", "expected a JSON object"),
        ('{"task": "", "input": "x", "target": "no"}', "'task' is empty"),
    ],
)
def test_load_jsonl_names_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"task": "a", "input": "x", "target": "yes"})
    path = _write(tmp_path / "d.jsonl", [good, good, bad_line, good])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_load_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no examples"):
        load_jsonl(_write(tmp_path / "e.jsonl", ["", "  "]))


def test_check_tasks_reports_unknown_task_with_line():
    rows = [Row("a", "x", "y", "f.jsonl", 1), Row("zzz", "x", "y", "f.jsonl", 2)]
    with pytest.raises(DataError, match=r"f\.jsonl:2: unknown task 'zzz'"):
        check_tasks(rows, ["a"])


def test_split_rows_is_deterministic_and_per_task():
    rows = [Row(t, f"{t}{i}", "yes") for t in ("a", "b") for i in range(20)]
    train, held = split_rows(rows, 0.25, seed=1)
    assert split_rows(rows, 0.25, seed=1) == (train, held)
    assert len(held) == 10 and len(train) == 30
    assert {r.task for r in held} == {"a", "b"}
    assert not {r.input for r in held} & {r.input for r in train}


def test_collator_pads_and_batches_task_ids(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    rows = [Row("animal", "the cat runs", "yes"), Row("color", "the big red dog sleeps now", "no")]
    features = encode_rows(rows, tok, "classification", {"animal": 0, "color": 1}, {"no": 0, "yes": 1})
    batch = PolyDataCollator(tok)(features)
    assert batch["task_ids"].tolist() == [0, 1]
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(DataError, match="unknown target"):
        encode_rows([Row("animal", "x", "maybe")], tok, "classification", {"animal": 0}, {"no": 0, "yes": 1})


def test_causal_lm_features_mask_the_prompt():
    class Tok:
        eos_token_id = 9
        pad_token_id = 0
        padding_side = "right"

        def __call__(self, texts, add_special_tokens=True, **_):
            return {"input_ids": [[len(w) for w in t.split()] for t in texts]}

    rows = [Row("t", "aa bbb", "c"), Row("t", "a", "dd ee")]
    feats = encode_rows(rows, Tok(), "causal-lm", {"t": 0}, max_length=16)
    assert feats[0]["input_ids"] == [2, 3, 1, 9] and feats[0]["labels"] == [-100, -100, 1, 9]
    batch = PolyDataCollator(Tok())(feats)
    assert batch["labels"].tolist() == [[-100, -100, 1, 9], [-100, 2, 2, 9]]


def test_hf_trainer_keeps_task_ids_for_polymodel(tiny_bert, tmp_path):
    """The real transformers Trainer, used directly with a PolyModel and PolyDataCollator."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from polytropon import PolyConfig, get_peft_model

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = get_peft_model(base, PolyConfig(task_type="SEQ_CLS", n_tasks=3, n_skills=2, r=2))
    rows = [Row(t, f"the {w} runs", "yes" if i % 2 else "no") for i, (t, w) in enumerate(
        [("a", "cat"), ("b", "dog"), ("c", "bird")] * 8)]
    features = encode_rows(rows, tok, "classification", {"a": 0, "b": 1, "c": 2}, {"no": 0, "yes": 1})
    seen: list[torch.Tensor] = []

    def record(_module, args, kwargs):
        seen.append(kwargs.get("task_ids"))

    model.register_forward_pre_hook(record, with_kwargs=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("module_logits")}
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-2,
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=PolyDataset(features), data_collator=PolyDataCollator(tok))
    trainer.train()
    assert len(seen) == 6
    assert all(isinstance(t, torch.Tensor) and t.shape == (4,) for t in seen)
    assert set(torch.cat(seen).tolist()) == {0, 1, 2}
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())]
    assert changed, "router logits did not train"


def test_documented_trainer_example_runs(tmp_path):
    """docs/trainer_example.py (the real default model, a few steps) runs as documented."""
    import os
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "src"), EXAMPLE_OUTPUT_DIR=str(tmp_path / "out"),
               EXAMPLE_MAX_STEPS="3", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(root, "docs", "trainer_example.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trainable params" in proc.stdout and "final loss" in proc.stdout

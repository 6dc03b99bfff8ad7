"""A PEFT Poly training script on the Hugging Face Trainer, with the import swapped for polytropon.

* the plain ``transformers.Trainer`` with default ``TrainingArguments`` keeps the ``task_ids`` column (and
  ``input_ids``) and trains: ``PolyModel.forward`` shows the wrapped model's parameters plus ``task_ids``;
* and writes ``save_model()`` and every checkpoint adapter-only, in PEFT's file names, loadable by
  ``PolyModel.from_pretrained`` and ``peft.PeftModel.from_pretrained`` with equal outputs (a PolyModel is a
  ``PreTrainedModel``, so the Trainer calls its ``save_pretrained``), resumes exactly and loads the best checkpoint
  at the end; ``polytropon.PolyTrainer`` (same script, one name changed) does the same;
* PEFT's own Poly example (``Seq2SeqTrainer`` with ``predict_with_generate``, task ids made in the tokenize
  function, ``PeftConfig``/``PeftModel.from_pretrained`` to reload) on a tiny T5 and synthetic tasks.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from tests.helpers import tiny_llama

datasets = pytest.importorskip("datasets")
pytest.importorskip("accelerate")
peft = pytest.importorskip("peft")

from transformers import Trainer, TrainingArguments  # noqa: E402

import polytropon  # noqa: E402
from polytropon import PolyConfig, get_peft_model  # noqa: E402

N_TASKS = 3


def _dataset(n: int = 24, length: int = 8, seed: int = 0):
    """Token rows whose continuation depends on the task: ``task_ids``, ``input_ids``, ``attention_mask``, ``labels``."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": [], "task_ids": []}
    for i in range(n):
        task = i % N_TASKS
        ids = torch.randint(3, 90, (length,), generator=g)
        ids[length // 2 :] = (ids[: length // 2] + task) % 90 + 3
        rows["input_ids"].append(ids.tolist())
        rows["attention_mask"].append([1] * length)
        rows["labels"].append(ids.tolist())
        rows["task_ids"].append(task)
    return datasets.Dataset.from_dict(rows)


def _poly_model(seed: int = 0):
    config = PolyConfig(task_type="CAUSAL_LM", r=4, n_tasks=N_TASKS, n_skills=2, n_splits=2, init_weights=False)
    torch.manual_seed(seed)
    return get_peft_model(tiny_llama(seed=seed), config)


def _args(out, **kw):
    kw.setdefault("per_device_train_batch_size", 4)
    kw.setdefault("max_steps", 6)
    kw.setdefault("learning_rate", 1e-2)
    return TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, seed=0, data_seed=0, **kw)


def _adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


def test_forward_signature_is_the_wrapped_models_plus_task_ids():
    model = _poly_model()
    params = inspect.signature(model.forward).parameters
    base = inspect.signature(model.get_base_model().forward).parameters
    assert list(params) == [*[p for p in base if p != "kwargs"], "task_ids", "kwargs"]
    assert params["task_ids"].kind is inspect.Parameter.KEYWORD_ONLY and params["task_ids"].default is None


def test_the_per_model_forward_survives_pickling_and_deepcopy():
    import copy
    import pickle

    model = _poly_model().eval()
    x = torch.randint(3, 90, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=x, task_ids=[0, 2]).logits
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert clone.forward.__self__ is clone
            assert "task_ids" in inspect.signature(clone.forward).parameters
            torch.testing.assert_close(clone(input_ids=x, task_ids=[0, 2]).logits, expected, rtol=0, atol=0)


def test_plain_trainer_with_default_arguments_keeps_task_ids_and_trains(tmp_path):
    """The unchanged PEFT-style script: default TrainingArguments (remove_unused_columns=True) on a task_ids column."""
    model = _poly_model()
    before = _adapter(model)
    trainer = Trainer(model=model, args=_args(tmp_path, save_strategy="no"), train_dataset=_dataset())
    batch = next(iter(trainer.get_train_dataloader()))
    assert {"input_ids", "attention_mask", "labels", "task_ids"} <= set(batch)
    assert batch["task_ids"].dtype == torch.long and batch["task_ids"].shape == (4,)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = _adapter(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _assert_adapter_only(folder, model) -> None:
    """PEFT's two files, plus ``model.safetensors`` holding exactly the trainable tensors; all weight files
    together adapter-sized: about twice the adapter, under half the whole model's state even for these tiny bases."""
    from safetensors.torch import load_file

    names = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= names, names
    assert not names & {"pytorch_model.bin", "model.safetensors.index.json"}, names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(load_file(os.path.join(folder, "model.safetensors"))) == trainable
    weights = sum(os.path.getsize(os.path.join(folder, n)) for n in names if n.endswith(WEIGHT_SUFFIXES)
                  and n not in {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"})
    adapter = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
    whole = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # what a whole-model file holds
    assert weights <= 2.2 * adapter and weights < whole / 2, (weights, adapter, whole)


def _assert_loads_in_polytropon_and_peft(folder, model) -> None:
    model.eval()
    x = torch.randint(3, 90, (3, 7))
    ids = torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = model(input_ids=x, task_ids=ids).logits
        ours = polytropon.PolyModel.from_pretrained(tiny_llama(seed=0), str(folder))
        theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(folder)).eval()
        torch.testing.assert_close(ours(input_ids=x, task_ids=ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(theirs(input_ids=x, task_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)


def test_plain_trainer_checkpoints_are_adapter_only_and_load_in_polytropon_and_peft(tmp_path):
    """The unchanged script (plain Trainer, default TrainingArguments): save_model() and every checkpoint."""
    model = _poly_model()
    assert isinstance(model, __import__("transformers").PreTrainedModel)
    trainer = Trainer(model=model, args=_args(tmp_path / "run", save_steps=3), train_dataset=_dataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-3", tmp_path / "run" / "checkpoint-6"):
        _assert_adapter_only(folder, model)
    _assert_loads_in_polytropon_and_peft(tmp_path / "final", model)
    # the final checkpoint holds the final adapter, read back by PEFT's own loader
    _assert_loads_in_polytropon_and_peft(tmp_path / "run" / "checkpoint-6", model)


def test_plain_trainer_resume_equals_an_uninterrupted_run(tmp_path, caplog):
    """Resumed from an adapter-only checkpoint, the plain Trainer ends exactly where an uninterrupted run ends,
    without listing the frozen base model's tensors as missing."""
    import logging

    from transformers.utils import logging as hf_logging

    full = _poly_model()
    Trainer(model=full, args=_args(tmp_path / "full", save_strategy="no"), train_dataset=_dataset()).train()
    Trainer(model=_poly_model(), args=_args(tmp_path / "cut", save_steps=3), train_dataset=_dataset()).train()
    resumed = _poly_model()
    _assert_adapter_only(tmp_path / "cut" / "checkpoint-3", resumed)
    trainer = Trainer(model=resumed, args=_args(tmp_path / "cut", save_strategy="no"), train_dataset=_dataset())
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    finally:
        hf_logging.disable_propagation()
    assert not [r for r in caplog.records if "missing keys" in r.getMessage() or "unexpected keys" in r.getMessage()]
    expected, got = _adapter(full), _adapter(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_plain_trainer_loads_the_best_checkpoint_at_the_end(tmp_path):
    """load_best_model_at_end: the best checkpoint (step 2 here, not the last) is loaded back into the model."""
    from safetensors.torch import load_file

    scores = iter([1.0, 0.0])  # the first evaluation (step 2) is the best

    def compute_metrics(_):
        return {"score": next(scores)}

    model = _poly_model()
    args = _args(tmp_path, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True, max_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(n=6),
                      compute_metrics=compute_metrics)
    trainer.train()
    assert os.path.basename(trainer.state.best_model_checkpoint) == "checkpoint-2"
    best = load_file(os.path.join(trainer.state.best_model_checkpoint, "model.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    params = dict(model.named_parameters())
    assert any(not torch.equal(best[n], last[n]) for n in best)
    for name, value in best.items():
        torch.testing.assert_close(params[name].detach(), value, rtol=0, atol=0, msg=name)


def test_save_pretrained_by_hand_writes_only_peft_files(tmp_path):
    """Only a trainer's call (``is_main_process=`` given) adds model.safetensors; a user's call writes PEFT's two."""
    model = _poly_model()
    model.save_pretrained(str(tmp_path / "user"))
    assert sorted(os.listdir(tmp_path / "user")) == ["adapter_config.json", "adapter_model.safetensors"]
    model.save_pretrained(str(tmp_path / "trainer"), is_main_process=True)
    assert sorted(os.listdir(tmp_path / "trainer")) == ["adapter_config.json", "adapter_model.safetensors", "model.safetensors"]
    model.save_pretrained(str(tmp_path / "other-rank"), is_main_process=False)
    assert not (tmp_path / "other-rank").exists()


def test_poly_trainer_checkpoints_are_adapter_only_and_load_in_polytropon_and_peft(tmp_path):
    model = _poly_model()
    trainer = polytropon.PolyTrainer(
        model=model, args=_args(tmp_path / "run", save_strategy="steps", save_steps=3), train_dataset=_dataset()
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in [tmp_path / "final", tmp_path / "run" / "checkpoint-3", tmp_path / "run" / "checkpoint-6"]:
        _assert_adapter_only(folder, model)
    _assert_loads_in_polytropon_and_peft(tmp_path / "final", model)


def test_poly_trainer_resume_equals_an_uninterrupted_run(tmp_path):
    full = _poly_model()
    polytropon.PolyTrainer(
        model=full, args=_args(tmp_path / "full", save_strategy="no"), train_dataset=_dataset(), router_lr=5e-2
    ).train()
    first = _poly_model()
    polytropon.PolyTrainer(
        model=first, args=_args(tmp_path / "cut", save_strategy="steps", save_steps=3), train_dataset=_dataset(),
        router_lr=5e-2,
    ).train()
    resumed = _poly_model(seed=0)
    trainer = polytropon.PolyTrainer(
        model=resumed, args=_args(tmp_path / "cut", save_strategy="no"), train_dataset=_dataset(), router_lr=5e-2
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    expected, got = _adapter(full), _adapter(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_poly_trainer_loads_the_best_checkpoint_at_the_end(tmp_path):
    model = _poly_model()
    args = _args(tmp_path, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=False, max_steps=4)
    trainer = polytropon.PolyTrainer(model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(n=6))
    trainer.train()
    best = polytropon.PolyModel.from_pretrained(tiny_llama(seed=0), trainer.state.best_model_checkpoint)
    for key, value in best.adapter_state_dict().items():
        torch.testing.assert_close(model.adapter_state_dict()[key], value, rtol=0, atol=0)


def test_poly_trainer_router_learning_rate_is_its_own_group(tmp_path):
    trainer = polytropon.PolyTrainer(
        model=_poly_model(), args=_args(tmp_path, save_strategy="no"), train_dataset=_dataset(), router_lr=0.5
    )
    groups = {g["name"]: g for g in trainer.create_optimizer().param_groups}
    assert groups["router"]["lr"] == 0.5 and groups["skills"]["lr"] == 1e-2
    assert groups["router"]["weight_decay"] == 0.0


def test_a_batch_without_task_ids_is_a_clear_error(tmp_path):
    data = _dataset().remove_columns(["task_ids"])
    model = _poly_model()
    before = _adapter(model)
    trainer = polytropon.PolyTrainer(model=model, args=_args(tmp_path, save_strategy="no"), train_dataset=data)
    with pytest.raises(ValueError, match=r"no 'task_ids' column .* give the dataset a 'task_ids' column"):
        trainer.train()
    after = _adapter(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_poly_trainer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="router_lr must be a non-negative number"):
        polytropon.PolyTrainer(model=_poly_model(), args=_args(tmp_path), router_lr=-1.0)
    with pytest.raises(TypeError, match="transformers.Trainer subclass"):
        polytropon.poly_trainer_class(dict)


# ---------------------------------------------------------------------- PEFT's examples/poly, ported
def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


class _CharTokenizer:
    """Characters a..z and digits as token ids 2.. (0 = pad, 1 = eos), enough for the example's tokenize function."""

    pad_token_id, eos_token_id = 0, 1
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 :"

    def _encode(self, text: str) -> list[int]:
        return [2 + self.alphabet.index(c) for c in text] + [1]

    def __call__(self, texts, max_length=32, truncation=True, padding="max_length", **_):
        ids = [self._encode(t)[:max_length] for t in texts]
        ids = [x + [0] * (max_length - len(x)) for x in ids]
        return {"input_ids": ids, "attention_mask": [[int(t != 0) for t in x] for x in ids]}

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(self.alphabet[t - 2] for t in row if t >= 2) for row in rows]


def test_peft_poly_example_seq2seq_with_generate(tmp_path):
    """PEFT's examples/poly (Seq2SeqTrainer, predict_with_generate, task ids in the tokenize function, reload
    through PeftConfig/PeftModel.from_pretrained), with only PolyConfig/get_peft_model imported from polytropon."""
    from peft import PeftConfig, PeftModel, TaskType
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, default_data_collator

    from polytropon import PolyConfig, get_peft_model  # the one swapped line: `from peft import ...`

    tokenizer = _CharTokenizer()
    tasks = ["copy", "reverse"]
    words = ["abc", "dog", "cat", "sun", "map", "pen", "owl", "fig"]
    raw = datasets.Dataset.from_dict({
        "task": [t for t in tasks for _ in words],
        "source": [w for _ in tasks for w in words],
        "target": [w if t == "copy" else w[::-1] for t in tasks for w in words],
    })

    def tokenize(examples):
        model_inputs = tokenizer([f"{t}: {s}" for t, s in zip(examples["task"], examples["source"])], max_length=16)
        labels = tokenizer(examples["target"], max_length=8)["input_ids"]
        model_inputs["labels"] = [[(t if t != tokenizer.pad_token_id else -100) for t in row] for row in labels]
        model_inputs["task_ids"] = [tasks.index(t) for t in examples["task"]]
        return model_inputs

    data = raw.map(tokenize, batched=True, remove_columns=raw.column_names)

    peft_config = PolyConfig(
        task_type=TaskType.SEQ_2_SEQ_LM, poly_type="poly", r=4, n_tasks=len(tasks), n_skills=2, n_splits=2,
        init_weights=False,
    )
    model = get_peft_model(_t5(), peft_config)
    model.print_trainable_parameters()

    def compute_metrics(eval_preds):
        preds, labels = eval_preds
        preds = [[t for t in row if t >= 0] for row in preds]
        labels = [[t for t in row if t >= 0] for row in labels]
        decoded = tokenizer.batch_decode(preds)
        wanted = tokenizer.batch_decode(labels)
        return {"exact_match": sum(p == w for p, w in zip(decoded, wanted)) / len(wanted)}

    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=1e-2, max_steps=8, eval_strategy="no", save_strategy="steps", save_steps=4,
        predict_with_generate=True,
        generation_max_length=8, report_to=[], use_cpu=True, seed=0,
    )
    trainer = Seq2SeqTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_exact_match" in metrics and 0.0 <= metrics["eval_exact_match"] <= 1.0

    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "out" / "checkpoint-4", tmp_path / "out" / "checkpoint-8"):
        _assert_adapter_only(folder, model)
    model.save_pretrained(str(tmp_path / "adapter"))
    config = PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert config.peft_type == "POLY" and config.n_tasks == len(tasks)
    reloaded = PeftModel.from_pretrained(_t5(), str(tmp_path / "adapter")).eval()
    model.eval()
    batch = default_data_collator([{k: data[i][k] for k in ("input_ids", "attention_mask")} for i in range(4)])
    ids = torch.tensor([data[i]["task_ids"] for i in range(4)])
    with torch.no_grad():
        ours = model.generate(**batch, task_ids=ids, max_new_tokens=6, do_sample=False)
        theirs = reloaded.generate(**batch, task_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)
    from_checkpoint = PeftModel.from_pretrained(_t5(), str(tmp_path / "out" / "checkpoint-8")).eval()
    with torch.no_grad():
        assert torch.equal(from_checkpoint.generate(**batch, task_ids=ids, max_new_tokens=6, do_sample=False), ours)

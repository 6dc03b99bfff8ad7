"""TRL's SFTTrainer on a PolyModel, on the data formats TRL documents, each with a per-example ``task_ids`` column.

``polytropon.PolySFTTrainer`` is ``trl.SFTTrainer`` with PolyTrainer's behaviour; everything else is TRL's
defaults (``bf16=True``: training under autocast) plus gradient checkpointing. The comparison with the plain Trainer
runs both in float32 (``bf16=False``), so that they can be compared to float round-off.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from safetensors.torch import load_file

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
pytest.importorskip("tokenizers")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import polytropon  # noqa: E402
from polytropon import PolyConfig, get_peft_model  # noqa: E402

WORDS = "the cat dog sat ran on mat log red blue one two three yes no say hello copy back".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} {% else %}<|assistant|> "
    "{% generation %}{{ m['content'] }} </s>{% endgeneration %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained offline on the test's words, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
    tok.train_from_iterator([" ".join(WORDS), ": ."], trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))
    return get_peft_model(base, PolyConfig(task_type="CAUSAL_LM", r=4, n_tasks=2, n_skills=2, init_weights=False))


def make_dataset(kind: str, n: int = 16):
    """Task 0 copies two words, task 1 swaps them; ``kind`` is TRL's format: text, prompt-completion, messages."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        a, b = rng.sample(WORDS[:10], 2)
        task = i % 2
        answer = f"{a} {b}" if task == 0 else f"{b} {a}"
        if kind == "text":
            rows.append({"text": f"{a} {b} : {answer}", "task_ids": task})
        elif kind == "prompt-completion":
            rows.append({"prompt": f"{a} {b} :", "completion": f" {answer}", "task_ids": task})
        else:
            rows.append({"messages": [{"role": "user", "content": f"{a} {b}"}, {"role": "assistant", "content": answer}],
                         "task_ids": task})
    return datasets.Dataset.from_list(rows)


def sft_args(out, **kw):
    from trl import SFTConfig

    kw.setdefault("max_steps", 4)
    return SFTConfig(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
        gradient_checkpointing=True, seed=0, data_seed=0, **kw,
    )


def adapter(model):
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


@pytest.mark.parametrize("kind", ["text", "prompt-completion", "messages"])
def test_sft_trainer_trains_each_format_with_task_ids(tmp_path, kind):
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    before = adapter(model)
    trainer = polytropon.PolySFTTrainer(
        model=model, args=sft_args(tmp_path, save_steps=2), train_dataset=make_dataset(kind), processing_class=tokenizer
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["task_ids"].dtype == torch.long and batch["task_ids"].shape == (4,)
    assert set(batch["task_ids"].tolist()) <= {0, 1}
    trainer.train()
    after = adapter(model)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        names = set(os.listdir(tmp_path / checkpoint))
        assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= names
        assert "pytorch_model.bin" not in names
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(load_file(str(tmp_path / checkpoint / "model.safetensors"))) == trainable  # adapter-only
    loaded = polytropon.PolyModel.from_pretrained(make_model(tokenizer).get_base_model(), str(tmp_path / "checkpoint-4"))
    for key, value in loaded.adapter_state_dict().items():
        torch.testing.assert_close(value, after[key], rtol=0, atol=0)


def test_sft_trainer_routes_every_example_by_its_task(tmp_path):
    """The task ids reach the model: swapping them changes the loss of a trained adapter's batch."""
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    trainer = polytropon.PolySFTTrainer(
        model=model, args=sft_args(tmp_path, save_strategy="no"), train_dataset=make_dataset("text"),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        right = trainer.compute_loss(model, dict(batch))
        swapped = trainer.compute_loss(model, {**batch, "task_ids": 1 - batch["task_ids"]})
    assert not torch.isclose(right, swapped, rtol=0, atol=1e-6)


def test_sft_trainer_equals_the_plain_trainer_on_the_same_batches(tmp_path):
    """TRL (fused LM head loss: mean NLL over the completion tokens; gradient checkpointing on) and the plain
    ``transformers.Trainer`` (the model's own loss; no checkpointing; its default optimizer) train the same
    adapter from the same batches, to float32 round-off."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from transformers import Trainer, TrainingArguments

    tokenizer = make_tokenizer()
    sft_model = make_model(tokenizer)
    sft = polytropon.PolySFTTrainer(
        model=sft_model, args=sft_args(tmp_path / "sft", save_strategy="no", bf16=False), train_dataset=make_dataset("messages"),
        processing_class=tokenizer,
    )
    sft.train()
    hf_model = make_model(tokenizer)
    hf = Trainer(
        model=hf_model,
        args=TrainingArguments(
            output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=4,
            report_to=[], use_cpu=True, gradient_checkpointing=False, seed=0, data_seed=0, save_strategy="no",
        ),
        train_dataset=sft.train_dataset,  # TRL's tokenized rows: input_ids, labels (completion only), task_ids
        data_collator=polytropon.TaskIdsCollator(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)),
    )
    hf.train()
    theirs, ours = adapter(hf_model), adapter(sft_model)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)


def test_packing_is_refused_with_the_fix(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    before = adapter(model)
    trainer = polytropon.PolySFTTrainer(
        model=model, args=sft_args(tmp_path, packing=True, max_length=32, save_strategy="no"),
        train_dataset=make_dataset("text"), processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match=r"packed row .* SFTConfig\(packing=False\)"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in adapter(model).items())


def test_padding_free_is_refused_with_the_fix(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    trainer = polytropon.PolySFTTrainer(
        model=model, args=sft_args(tmp_path, padding_free=True, max_length=None, save_strategy="no"),
        train_dataset=make_dataset("text"), processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match=r"padding_free=False"):
        next(iter(trainer.get_train_dataloader()))


def test_the_plain_sft_trainer_drops_task_ids_and_the_model_says_so(tmp_path):
    """Why PolySFTTrainer: TRL keeps only input_ids/labels/seq_lengths and its collator builds no task_ids."""
    from trl import SFTTrainer

    tokenizer = make_tokenizer()
    trainer = SFTTrainer(
        model=make_model(tokenizer), args=sft_args(tmp_path, save_strategy="no"), train_dataset=make_dataset("text"),
        processing_class=tokenizer,
    )
    assert "task_ids" not in next(iter(trainer.get_train_dataloader()))
    with pytest.raises(ValueError, match="task_ids are required"):
        trainer.train()

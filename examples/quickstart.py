"""Train a Poly adapter on two conflicting tasks, save it, and reload it with PEFT (or polytropon).

    python examples/quickstart.py

Runs offline in well under a minute on a CPU: the model is a small BERT built from a config.
"""

import copy
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification

from polytropon import PolyConfig, PolyModel, get_peft_model


def batch(n: int, gen: torch.Generator):
    """Sentences of low or high token ids. Task 0 asks "high?", task 1 asks "low?": they always disagree."""
    high = torch.randint(0, 2, (n,), generator=gen)
    input_ids = torch.randint(3, 43, (n, 8), generator=gen) + 40 * high[:, None]
    task_ids = torch.randint(0, 2, (n,), generator=gen)
    return input_ids, task_ids, high ^ task_ids


def main() -> None:
    torch.manual_seed(0)
    base = BertForSequenceClassification(
        BertConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_labels=2)
    )
    pristine = copy.deepcopy(base)  # stands for the base model a user would load again from disk
    config = PolyConfig(n_tasks=2, n_skills=2, r=4, target_modules=["query", "value", "intermediate.dense"])
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    skills = [p for n, p in model.named_parameters() if p.requires_grad and "module_logits" not in n]
    routers = [p for n, p in model.named_parameters() if "module_logits" in n]
    optimizer = torch.optim.AdamW([{"params": skills, "lr": 2e-2}, {"params": routers, "lr": 0.5}])
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(300):
        input_ids, task_ids, labels = batch(32, gen)
        loss = model(input_ids=input_ids, labels=labels, task_ids=task_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    model.eval()
    input_ids, task_ids, labels = batch(500, torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = (model(input_ids=input_ids, task_ids=task_ids).logits.argmax(-1) == labels).float().mean()
    print(f"held-out accuracy with task routing: {accuracy:.3f} (chance: 0.5)")

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)  # adapter_config.json + adapter_model.safetensors, PEFT's format
        reloaded = PolyModel.from_pretrained(pristine, directory)
        with torch.no_grad():
            same = torch.allclose(reloaded(input_ids=input_ids, task_ids=task_ids).logits,
                                  model(input_ids=input_ids, task_ids=task_ids).logits, atol=1e-5)
        print(f"reloaded from {directory}: identical outputs = {same}")


if __name__ == "__main__":
    main()

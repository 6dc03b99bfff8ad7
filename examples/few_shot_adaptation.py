"""Train a Poly adapter on four tasks, read its task hierarchy, then adapt to an unseen task (MHR-z, MHR-mu).

    python examples/few_shot_adaptation.py [output directory for the PNGs]

Runs offline in seconds on a CPU: the model is a small Llama built from a config. The synthetic tasks continue
arithmetic token sequences; tasks "a" and "b" share one rule (step 5), "c" and "d" another (step 11), and the
unseen task "new" follows the rule of "a" and "b". Printed: the learned task similarity (the dendrogram should
pair a-b and c-d), then the loss on "new" before and after a few steps of

* MHR-z: a new router row, skills frozen -- only the routing of "new" trains (a few hundred parameters);
* MHR-mu: the skills averaged into one LoRA, fine-tuned.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from typing import Optional

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import polytropon
from polytropon import PolyConfig, get_peft_model
from polytropon.toolkit.plots import plot_routing

VOCAB = 64
RULES = {"a": 5, "b": 5, "c": 11, "d": 11, "new": 5}


def batch(tasks: list[str], n: int, gen: torch.Generator, length: int = 8) -> tuple[torch.Tensor, list[str]]:
    """``n`` sequences; each picks a task from ``tasks`` and continues ``start + k * RULES[task]`` (mod vocab)."""
    pick = torch.randint(0, len(tasks), (n,), generator=gen).tolist()
    names = [tasks[i] for i in pick]
    start = torch.randint(3, VOCAB, (n, 1), generator=gen)
    step = torch.tensor([RULES[name] for name in names])
    return (start - 3 + step[:, None] * torch.arange(length)) % (VOCAB - 3) + 3, names


def loss_on(model, input_ids: torch.Tensor, task) -> float:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids, labels=input_ids, task_ids=[task]).loss.item()


def train(model, tasks, steps: int, lr: float, router_lr: float, seed: int, task_of=None) -> None:
    optimizer = torch.optim.AdamW(polytropon.param_groups(model, lr=lr, router_lr=router_lr), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        input_ids, names = batch(tasks, 16, gen)
        task_ids = [task_of(n) for n in names] if task_of else names
        loss = model(input_ids=input_ids, labels=input_ids, task_ids=task_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def run(steps: int = 150, few_shot_steps: int = 20, plot_dir: Optional[str] = None) -> dict[str, float]:
    """The whole workflow; returns the measured losses on the unseen task (and the similarity figures)."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    config = PolyConfig(n_tasks=4, n_skills=4, r=4, task_names=["a", "b", "c", "d"],
                        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, config)
    train(model, ["a", "b", "c", "d"], steps, lr=5e-2, router_lr=0.3, seed=1)

    sim = polytropon.task_similarity(model)
    out = {"sim_ab": sim[0, 1].item(), "sim_cd": sim[2, 3].item(), "sim_ac": sim[0, 2].item()}
    if plot_dir is not None:
        figures = plot_routing(model, plot_dir)
        out["dendrogram_order"] = figures["task_hierarchy"].order

    held_out, _ = batch(["new"], 64, torch.Generator().manual_seed(7))
    out["trained_task_a"] = loss_on(model, held_out, "a")  # the same rule: the best one can hope for
    out["trained_task_c"] = loss_on(model, held_out, "c")  # the other rule

    mhr_z = copy.deepcopy(model)
    mhr_z.add_tasks(["new"], init="uniform")
    out["mhr_z_trainable"] = mhr_z.freeze_skills()
    out["mhr_z_before"] = loss_on(mhr_z, held_out, "new")
    train(mhr_z, ["new"], few_shot_steps, lr=0.0, router_lr=0.3, seed=3)
    out["mhr_z_after"] = loss_on(mhr_z, held_out, "new")

    mhr_mu = copy.deepcopy(model)
    polytropon.collapse_to_average(mhr_mu, new_adapter_name="mu")
    out["mhr_mu_trainable"] = mhr_mu.get_nb_trainable_parameters()[0]
    out["mhr_mu_before"] = loss_on(mhr_mu, held_out, 0)
    train(mhr_mu, ["new"], few_shot_steps, lr=5e-2, router_lr=0.0, seed=3, task_of=lambda _: 0)
    out["mhr_mu_after"] = loss_on(mhr_mu, held_out, 0)
    return out


def main() -> None:
    torch.set_num_threads(1)
    plot_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="polytropon-")
    r = run(plot_dir=plot_dir)
    print(f"task similarity: a-b {r['sim_ab']:.3f}, c-d {r['sim_cd']:.3f}, a-c {r['sim_ac']:.3f}")
    print(f"dendrogram order (top to bottom): {r['dendrogram_order']}; figures in {os.path.abspath(plot_dir)}")
    print(f"loss on the unseen task with trained task a's routing: {r['trained_task_a']:.3f}, task c's: {r['trained_task_c']:.3f}")
    print(f"MHR-z  ({r['mhr_z_trainable']} trainable): {r['mhr_z_before']:.3f} -> {r['mhr_z_after']:.3f}")
    print(f"MHR-mu ({r['mhr_mu_trainable']} trainable): {r['mhr_mu_before']:.3f} -> {r['mhr_mu_after']:.3f}")


if __name__ == "__main__":
    main()

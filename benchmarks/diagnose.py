"""Diagnose the two training paths and the tasks a run answers the same for every example.

Trains one multi-task method (``poly``, ``mhr``, ``lora-params`` or ``lora-rank`` of
:mod:`polytropon.app.experiment`) on the built-in suite's training data minus a validation split carved from it
(the last ``--validation`` training examples of every task; the suite's eval split is never read), with the
project's one training path -- :func:`polytropon.app.training.make_trainer`, the CLI's HF ``Trainer`` --
optionally with another gradient-norm clipping (``--clip``; ``0`` for none).

Both start from the same model (base model, head drawn with the training seed, fresh adapter). After training it
measures, per task on the validation split: accuracy, loss, the share of the majority prediction, the spread of the
logit margin, the spread of the pooled representation (relative to the base model's), the size of the adapter's
update against the base layer's output, and the routing weights. One JSON line per run goes to ``--log``.

    python benchmarks/diagnose.py --method poly --seed 0 --steps 300
    python benchmarks/diagnose.py --method poly --clip 0 --seed 0
    python benchmarks/diagnose.py --summary      # the table of every run in the log
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from claims import json_safe  # noqa: E402
from polytropon import get_peft_model  # noqa: E402
from polytropon.app import experiment  # noqa: E402
from polytropon.app.defaults import default_model_path  # noqa: E402
from polytropon.app.data import PolyDataCollator, PolyDataset, encode_rows  # noqa: E402
from polytropon.toolkit.analysis import snapshot  # noqa: E402
from polytropon.toolkit.diagnostics import collapsed_tasks  # noqa: E402


# --------------------------------------------------------------------------- training paths


def train_trainer(model, features, tokenizer, steps, batch_size, lr, router_lr, seed, warmup_ratio, clip, trace):
    """Train with the CLI's :func:`~polytropon.app.training.make_trainer`; ``clip`` sets ``max_grad_norm`` (None:
    the Trainer's default 1.0; 0: none); ``trace(step)`` runs before the first step and every 50 steps."""
    from transformers import TrainerCallback

    from polytropon.app.training import make_trainer

    class Trace(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % 50 == 0:
                trace(state.global_step)

    args = argparse.Namespace(
        epochs=1.0, max_steps=steps, lr=lr, router_lr=router_lr, weight_decay=0.0, warmup_ratio=warmup_ratio,
        batch_size=batch_size, grad_accum=1, logging_steps=10 if steps >= 10 else 1, save_steps=10**9, seed=seed, bf16=False, quiet=True,
        ibp_alpha=None,
    )
    trace(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(args, tmp, model, tokenizer, PolyDataset(features), save_checkpoints=False)
        trainer.add_callback(Trace())
        if clip is not None:
            trainer.args.max_grad_norm = clip  # 0: no clipping
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        norms = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    model.eval()
    return losses, norms


# --------------------------------------------------------------------------- measurements


def adapted_modules(model) -> list[tuple[str, Any]]:
    """``(name, module)`` of every layer wrapped by the adapter (those with ``base_layer`` and ``adapters``)."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "adapters")]


@torch.no_grad()
def per_example(model, tokenizer, rows, task_to_id, max_length, adapter: bool = True) -> dict[str, Any]:
    """Logits, pooled output, pooler input (CLS hidden state) and per-layer ``||update|| / ||base output||`` for
    every row (eval mode)."""
    model.eval()
    collate = PolyDataCollator(tokenizer)
    pooled, cls, logits, ratios, prefix_attn = [], [], [], defaultdict(list), []
    net = model.get_base_model() if hasattr(model, "get_base_model") else model
    hooks = [net.classifier.register_forward_pre_hook(lambda m, a: pooled.append(a[0].detach().clone())),
             net.bert.pooler.dense.register_forward_pre_hook(lambda m, a: cls.append(a[0].detach().clone()))]
    if adapter:
        for name, module in adapted_modules(model):
            def hook(m, a, out, name=name):
                base = m.base_layer(a[0])
                mask = current_mask[0].unsqueeze(-1)  # only real tokens
                delta = ((out - base) * mask).flatten(1).norm(dim=1)
                ratios[name].append(delta / (base * mask).flatten(1).norm(dim=1))
            hooks.append(module.register_forward_hook(hook))
    current_mask: list[torch.Tensor] = [None]
    try:
        for start in range(0, len(rows), 64):
            chunk = rows[start:start + 64]
            batch = collate(encode_rows(chunk, tokenizer, "classification", task_to_id, experiment.LABEL_TO_ID, max_length))
            task_ids = batch.pop("task_ids")
            batch.pop("labels")
            current_mask[0] = batch["attention_mask"].float()
            if adapter:
                out = model(**batch, task_ids=task_ids, output_attentions=True)
            else:
                with model.disable_adapter():
                    out = model(**batch, task_ids=task_ids, output_attentions=True)
            logits.append(out.logits.float())
            # share of the [CLS] token's attention on the question prefix (the tokens up to the first "?"),
            # which is the same for every example of a task: per layer, mean over heads
            qmark = tokenizer.convert_tokens_to_ids("?")
            is_q = batch["input_ids"] == qmark
            end = torch.where(is_q.any(1), is_q.float().argmax(1), torch.zeros_like(is_q[:, 0], dtype=torch.long))
            pos = torch.arange(batch["input_ids"].shape[1])[None, :]
            prefix = ((pos >= 1) & (pos <= end[:, None])).float()
            sentence = ((pos > end[:, None]) & (batch["attention_mask"] > 0)
                        & (batch["input_ids"] != tokenizer.sep_token_id)).float()
            cls_rows = torch.stack([a[:, :, 0, :].mean(1) for a in out.attentions], 1)  # (b, layers, seq)
            prefix_attn.append(torch.stack([(cls_rows * prefix[:, None, :]).sum(-1),
                                            (cls_rows * sentence[:, None, :]).sum(-1)], -1))  # (b, layers, 2)
    finally:
        for h in hooks:
            h.remove()
    result = {"logits": torch.cat(logits), "pooled": torch.cat(pooled), "cls": torch.cat(cls),
              "prefix_attn": torch.cat(prefix_attn)}
    if adapter:
        result["ratio"] = torch.stack([torch.cat(v) for v in ratios.values()], 1)  # (n, n_layers)
    return result


def spread(x: torch.Tensor) -> float:
    """Mean distance of the rows of ``x`` to their centroid."""
    return float((x - x.mean(0)).norm(dim=1).mean())


def router_state(model, n_tasks: int) -> dict[str, Any]:
    """Per task: eval routing weights (mean over routers and splits of the max weight, the entropy), and the raw
    ``sum_s sigmoid(z)`` per split (its minimum over routers: how close the normaliser's 1e-12 comes)."""
    per_router = snapshot(model).per_router()  # [(rows, n_splits, n_skills)]
    if not per_router or per_router[0].shape[-1] == 1:
        return {}
    w = torch.stack([r[:n_tasks].float() for r in per_router])  # (routers, tasks, splits, skills)
    ent = -(w.clamp_min(1e-12) * w.clamp_min(1e-12).log()).sum(-1)  # (routers, tasks, splits)
    sig_sums, logit_abs = [], []
    for name, p in model.named_parameters():
        if name.endswith("module_logits"):
            z = p.detach()[:n_tasks]
            s = w.shape[-1]
            sig_sums.append(torch.sigmoid(z).view(n_tasks, -1, s).sum(-1).min(-1).values)
            logit_abs.append(z.abs().max(-1).values)
    return {
        "max_weight": w.max(-1).values.mean((0, 2)).tolist(),
        "entropy": ent.mean((0, 2)).tolist(),
        "entropy_uniform": math.log(w.shape[-1]),
        "min_sigmoid_sum": torch.stack(sig_sums).min(0).values.tolist(),
        "max_abs_logit": torch.stack(logit_abs).max(0).values.tolist(),
    }


def delta_norms(model, n_tasks: int) -> list[float]:
    """Per task: mean over adapted layers of ``||dW_task||_F / ||W||_F``."""
    adapter = model.active_adapter
    out = np.zeros(n_tasks)
    mods = adapted_modules(model)
    for _, m in mods:
        w = m.base_layer.weight.detach().norm()
        for t in range(n_tasks):
            out[t] += float(m.delta_weight(adapter, t).detach().norm() / w)
    return (out / len(mods)).tolist()


def diagnose(model, base_stats, data, max_length) -> dict[str, Any]:
    tasks = data.tasks
    task_to_id = {t: i for i, t in enumerate(tasks)}
    rows = data.eval_rows
    ex = per_example(model, data.tokenizer, rows, task_to_id, max_length)
    labels = torch.tensor([experiment.LABEL_TO_ID[r.target] for r in rows])
    names = [r.task for r in rows]
    probs = torch.softmax(ex["logits"], -1)
    preds = probs.argmax(-1)
    margin = ex["logits"][:, 1] - ex["logits"][:, 0]
    loss = torch.nn.functional.cross_entropy(ex["logits"], labels, reduction="none")
    per_task = {}
    for t in tasks:
        idx = torch.tensor([i for i, n in enumerate(names) if n == t])
        bidx = idx
        per_task[t] = {
            "accuracy": float((preds[idx] == labels[idx]).float().mean()),
            "loss": float(loss[idx].mean()),
            "majority_share": float(max((preds[idx] == 0).float().mean(), (preds[idx] == 1).float().mean())),
            "margin_std": float(margin[idx].std()),
            "margin_mean": float(margin[idx].mean()),
            "pooled_spread_rel": spread(ex["pooled"][idx]) / max(spread(base_stats["pooled"][bidx]), 1e-12),
            "cls_spread_rel": spread(ex["cls"][idx]) / max(spread(base_stats["cls"][bidx]), 1e-12),
            "update_ratio": float(ex["ratio"][idx].mean()),
            "update_ratio_max_layer": float(ex["ratio"][idx].mean(0).max()),
            # per layer: [share of [CLS]'s attention on the question prefix, on the sentence]
            "cls_attention_prefix_sentence": ex["prefix_attn"][idx].mean(0).tolist(),
            "cls_attention_prefix_sentence_base": base_stats["prefix_attn"][idx].mean(0).tolist(),
        }
    collapsed = collapsed_tasks(probs, names, labels.tolist())
    return {"per_task": per_task, "collapsed": collapsed, "router": router_state(model, len(tasks)),
            "delta_norm": delta_norms(model, len(tasks)),
            "mean_accuracy": float(np.mean([v["accuracy"] for v in per_task.values()]))}


def summary(path: str) -> str:
    """A Markdown table of the runs in the log ``path``: one row per configuration, validation accuracy mean ± std
    over its seeds (sample std), and per seed the collapsed tasks (same answer for every example) and the
    squeezed ones (within-task spread of the pooled representation below half the base model's)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                r = json.loads(line)
                key = (r["method"], r["path"], r["order"], r["clip"], r["steps"], r["lr"], r["router_lr"], r["suite_seed"])
                groups[key].append(r)
    out = ["| method | path | steps | lr | router lr | seeds | val accuracy | per seed | collapsed tasks per seed | "
           "squeezed tasks per seed | update / base output | grad norm > 1 |",
           "| --- | --- | ---: | ---: | ---: | --- | --- | --- | --- | --- | --- | --- |"]
    for (method, path_, order, clip, steps, lr, router_lr, _), runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        acc = np.array([r["mean_accuracy"] for r in runs])
        std = f" ± {acc.std(ddof=1):.3f}" if len(acc) > 1 else ""
        name = path_ + (" (loop order)" if order == "loop" else "") + ("" if clip is None else f" clip {clip:g}")
        contracted = [sum(v["pooled_spread_rel"] < 0.5 for v in r["per_task"].values()) for r in runs]
        ratio = np.mean([np.mean([v["update_ratio"] for v in r["per_task"].values()]) for r in runs])
        clipped = max(r["grad_norm_share_clipped_at_1"] for r in runs)
        out.append(f"| {method} | {name} | {steps} | {lr:g} | {router_lr:g} | {','.join(str(r['seed']) for r in runs)} | "
                   f"{acc.mean():.3f}{std} | {', '.join(f'{a:.3f}' for a in acc)} | "
                   f"{', '.join(str(len(r['collapsed'])) for r in runs)} | {', '.join(map(str, contracted))} | "
                   f"{ratio:.2f} | {clipped:.0%} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="poly", choices=["poly", "mhr", "lora-params", "lora-rank"])
    p.add_argument("--clip", type=float, default=None, help="max gradient norm (0: none; default: the Trainer's 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--suite-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--router-lr", type=float, default=3e-1)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--validation", type=int, default=40)
    p.add_argument("--tag", default="")
    p.add_argument("--log", default=os.path.join(HERE, "results", "diagnose.jsonl"))
    p.add_argument("--summary", action="store_true", help="print the table of the runs in --log and exit")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(args.log))
        return 0
    torch.set_num_threads(1)
    base = experiment.BaseModel(default_model_path())
    base.model.set_attn_implementation("eager")  # attention weights for the prefix measurement
    data = experiment.load_suite_data(base.tokenizer, args.suite_seed, 400, 40, 16, 50, validation=args.validation)
    recipe = experiment.Recipe(steps=args.steps, lr=args.lr, router_lr=args.router_lr, warmup_ratio=args.warmup_ratio)
    config, _ = experiment.method_config(args.method, recipe, len(data.tasks), data.tasks)
    model = get_peft_model(base.fresh(args.seed), config)
    task_to_id = {t: i for i, t in enumerate(data.tasks)}
    base_stats = per_example(model, data.tokenizer, data.eval_rows, task_to_id, recipe.max_length, adapter=False)
    trajectory = []

    def trace(step: int) -> None:
        trajectory.append({"step": step, "delta_norm": float(np.mean(delta_norms(model, len(data.tasks))))})

    started = time.time()
    losses, norms = train_trainer(model, data.train, data.tokenizer, args.steps, recipe.batch_size, args.lr,
                                  args.router_lr, args.seed, args.warmup_ratio, args.clip, trace)
    result = diagnose(model, base_stats, data, recipe.max_length)
    line = {"tag": args.tag, "method": args.method, "path": "trainer", "order": "own", "clip": args.clip,
            "seed": args.seed, "suite_seed": args.suite_seed, "steps": args.steps, "lr": args.lr,
            "router_lr": args.router_lr, "warmup_ratio": args.warmup_ratio, "validation_per_task": args.validation,
            "command": "python benchmarks/diagnose.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "loss_first10": float(np.mean(losses[:10])) if losses else None,
            "loss_last10": float(np.mean(losses[-10:])) if losses else None,
            "grad_norm_median": float(np.median(norms)) if norms else None,
            "grad_norm_share_clipped_at_1": float(np.mean(np.asarray(norms) > 1.0)) if norms else None,
            "trajectory": trajectory, **result}
    os.makedirs(os.path.dirname(args.log), exist_ok=True)
    with open(args.log, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(json_safe(line)) + "\n")
    print(f"{args.method} clip={args.clip} seed={args.seed} lr={args.lr} "
          f"router_lr={args.router_lr} steps={args.steps}: val {result['mean_accuracy']:.3f}, "
          f"collapsed {len(result['collapsed'])} {result['collapsed']}, grad-norm median {line['grad_norm_median']:.3g} "
          f"(>1 in {line['grad_norm_share_clipped_at_1']:.0%} of steps), "
          f"({time.time() - started:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

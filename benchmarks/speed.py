"""Speed and memory of polytropon's Poly/MHR against PEFT's Poly, PEFT's LoRA and the frozen base model.

Usage::

    PYTHONPATH=src python benchmarks/speed.py            # the configuration of issue 3 (a few minutes on 2 cores)
    PYTHONPATH=src python benchmarks/speed.py --quick    # a smaller model and fewer repeats (~1 minute)

The model is a randomly initialised Llama-style causal LM (hidden 256, 4 layers, intermediate 688, 4 heads,
vocabulary 512) with all seven projections adapted: r 8, 8 skills, 4 splits (MHR), 8 tasks. Batches are
8 x 128 tokens with every example on a different task (mixed tasks). Four variants share the same base
weights, and ours and PEFT's Poly the same adapter weights (checked: their logits must agree to 1e-5):

* ``ours``       polytropon ``get_peft_model``
* ``peft_poly``  ``peft.get_peft_model`` with ``peft.PolyConfig``
* ``peft_lora``  ``peft.get_peft_model`` with ``peft.LoraConfig`` (r 8, same targets; one task only)
* ``base``       the frozen base model (training step: backward to the input embeddings, no weight grads)

Timed workloads (``time.perf_counter``, torch's default thread count):

* ``train``      forward + backward of the LM loss, ``model.train()``, gradients freed after each step
* ``infer``      forward under ``torch.no_grad()``, ``model.eval()``
* ``generate``   greedy ``generate``: batch 4, 32-token prompts, exactly 24 new tokens, KV cache on
* ``merged``     (ours only) forward with task 0 merged into the weights, timed against ``base`` on a
                 single-task batch

Each repeat runs every variant once, in an order rotated from repeat to repeat (interleaved), after
warm-up calls; the table shows medians over repeats and, as ratios, the median over repeats of the ratio
within a repeat (two variants timed back to back share the machine's state of the moment, so slow drifts of
its speed cancel), followed by the interquartile range of those per-repeat ratios. The merged comparison
(two quick variants) runs three times as many repeats.

Peak memory of a training step: each variant runs in a fresh subprocess that builds the model, does one
warm-up step, then resets the kernel's resident-set high-water mark (``echo 5 > /proc/self/clear_refs``),
records the current resident set, runs one step and reads ``VmHWM`` from ``/proc/self/status``. The
difference is the extra resident memory the step needed at its peak (saved activations, gradients,
temporaries). The subprocesses run with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` so that
glibc maps every tensor of 64 KiB or more separately and returns it when freed: the resident set then
follows the live tensors, instead of staying at whatever the allocator kept from the warm-up step. ``tracemalloc`` cannot see torch's allocations, and CPU torch has no allocator
statistics, hence the process-level measurement. Linux only; the column is skipped elsewhere.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("ours", "peft_poly", "peft_lora", "base")


@dataclass
class Setup:
    """The benchmark configuration."""

    hidden: int = 256
    layers: int = 4
    intermediate: int = 688
    heads: int = 4
    vocab: int = 512
    r: int = 8
    n_skills: int = 8
    n_splits: int = 4
    n_tasks: int = 8
    batch: int = 8
    seq: int = 128
    gen_batch: int = 4
    gen_prompt: int = 32
    gen_new: int = 24
    repeats: int = 25
    gen_repeats: int = 13
    memory_repeats: int = 3


QUICK = Setup(hidden=128, layers=2, intermediate=344, vocab=256, seq=64, repeats=7, gen_repeats=3, gen_new=12, memory_repeats=1)


def base_model(setup: Setup, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=setup.vocab, hidden_size=setup.hidden, intermediate_size=setup.intermediate,
        num_hidden_layers=setup.layers, num_attention_heads=setup.heads, num_key_value_heads=setup.heads,
        max_position_embeddings=max(setup.seq, setup.gen_prompt + setup.gen_new) + 8, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def build(variant: str, setup: Setup, base: Optional[torch.nn.Module] = None) -> torch.nn.Module:
    """One variant on a copy of ``base`` (a fresh seeded base when ``None``); adapters seeded identically."""
    base = copy.deepcopy(base) if base is not None else base_model(setup)
    torch.manual_seed(1)
    if variant == "ours":
        from polytropon import PolyConfig, get_peft_model

        cfg = PolyConfig(r=setup.r, n_tasks=setup.n_tasks, n_skills=setup.n_skills, n_splits=setup.n_splits,
                         target_modules=TARGETS, init_weights=False, task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
    elif variant == "peft_poly":
        import peft

        cfg = peft.PolyConfig(r=setup.r, n_tasks=setup.n_tasks, n_skills=setup.n_skills, n_splits=setup.n_splits,
                              target_modules=TARGETS, init_weights=False, task_type="CAUSAL_LM")
        model = peft.get_peft_model(base, cfg)
    elif variant == "peft_lora":
        import peft

        cfg = peft.LoraConfig(r=setup.r, lora_alpha=1, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM",
                              init_lora_weights=False)
        model = peft.get_peft_model(base, cfg)
    elif variant == "base":
        model = base
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if variant in ("ours", "peft_poly"):
        # random non-trivial routing, the same for both (identical seeds give identical draws)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "module_logits" in name:
                    p.normal_()
    return model


class Workloads:
    """The timed calls of one variant; every call returns nothing and leaves the model as it found it."""

    def __init__(self, variant: str, model: torch.nn.Module, setup: Setup) -> None:
        self.variant, self.model, self.setup = variant, model, setup
        g = torch.Generator().manual_seed(2)
        self.input_ids = torch.randint(3, setup.vocab, (setup.batch, setup.seq), generator=g)
        self.task_ids = torch.randperm(setup.n_tasks, generator=g)[: setup.batch] % setup.n_tasks
        if setup.batch > setup.n_tasks:
            self.task_ids = torch.arange(setup.batch) % setup.n_tasks
        self.prompt = torch.randint(3, setup.vocab, (setup.gen_batch, setup.gen_prompt), generator=g)
        self.gen_tasks = self.task_ids[: setup.gen_batch]
        self.single_tasks = torch.zeros(setup.batch, dtype=torch.long)

    def _kw(self, task_ids: torch.Tensor) -> dict:
        return {} if self.variant in ("base", "peft_lora") else {"task_ids": task_ids}

    #: the mode each workload needs, set by :meth:`set_mode` before the timed calls (``Module.train()`` walks every
    #: submodule: timing it would charge the adapters' extra modules to every call)
    MODES = {"train": True, "infer": False, "infer_single": False, "generate": False}

    def set_mode(self, workload: str) -> None:
        self.model.train(self.MODES[workload])

    def train(self) -> None:
        m = self.model
        if self.variant == "base":
            embeds = m.get_input_embeddings()(self.input_ids).detach().requires_grad_(True)
            loss = m(inputs_embeds=embeds, labels=self.input_ids).loss
        else:
            loss = m(input_ids=self.input_ids, labels=self.input_ids, **self._kw(self.task_ids)).loss
        loss.backward()
        for p in m.parameters():
            p.grad = None

    def infer(self) -> None:
        with torch.no_grad():
            self.model(input_ids=self.input_ids, **self._kw(self.task_ids))

    def infer_single(self) -> None:
        """Single-task batch (task 0), for the merged comparison; ``ours`` must have task 0 merged."""
        with torch.no_grad():
            self.model(input_ids=self.input_ids)

    def generate(self) -> None:
        s = self.setup
        out = self.model.generate(
            input_ids=self.prompt, attention_mask=torch.ones_like(self.prompt), max_new_tokens=s.gen_new,
            min_new_tokens=s.gen_new, do_sample=False, pad_token_id=0, **self._kw(self.gen_tasks),
        )
        assert out.shape[1] == s.gen_prompt + s.gen_new


def check_equal(models: dict[str, torch.nn.Module], w: Workloads) -> float:
    """Max relative difference between our logits and PEFT Poly's (eval, mixed tasks)."""
    outs = {}
    for name in ("ours", "peft_poly"):
        models[name].eval()
        with torch.no_grad():
            outs[name] = models[name](input_ids=w.input_ids, task_ids=w.task_ids).logits
    return float((outs["ours"] - outs["peft_poly"]).abs().max() / outs["peft_poly"].abs().max())


class Timings(dict):
    """Seconds per round of every call: ``{name: [t_round_0, t_round_1, ...]}``."""

    def median(self, name: str) -> float:
        return statistics.median(self[name])

    def ratios(self, name: str, other: str) -> list[float]:
        """``t_name / t_other`` round by round (the two ran back to back in every round), sorted."""
        return sorted(a / b for a, b in zip(self[name], self[other]))

    def ratio(self, name: str, other: str) -> float:
        """Median over rounds of the per-round ratio: slow drifts of the machine's speed cancel within a round."""
        return statistics.median(self.ratios(name, other))


#: the clock of the timings: wall-clock (``time.perf_counter``) or the process's CPU time (``--clock cpu``)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def time_interleaved(calls: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> Timings:
    """Seconds of each call in each of ``repeats`` rounds, the order rotating every round.

    On a shared, loaded machine wall-clock times measure the other jobs too; with ``--clock cpu --threads 1`` the
    process's CPU time of one thread is timed instead (waits for a core are not counted).
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    samples = Timings({name: [] for name in names})
    for i in range(repeats):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            t0 = clock()
            calls[name]()
            samples[name].append(clock() - t0)
    return samples


# ---------------------------------------------------------------------- memory (one subprocess per measurement)
#: glibc settings for the memory subprocesses: every allocation of 64 KiB or more gets its own mapping and is
#: unmapped when freed, and the heap is trimmed, so the resident set follows the live tensors instead of
#: keeping freed memory around (without this a step's peak hides in memory the allocator already holds).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(variant: str, quick: bool) -> None:
    """Print the peak extra resident memory (MiB) of one training step of ``variant`` as JSON."""
    setup = QUICK if quick else Setup()
    model = build(variant, setup)
    w = Workloads(variant, model, setup)
    w.set_mode("train")
    w.train()  # warm-up: lazy initialisations, allocator pools
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident set
    before = _status_kb("VmRSS")
    w.train()
    peak = _status_kb("VmHWM")
    print(json.dumps({"variant": variant, "peak_mib": (peak - before) / 1024}))


def measure_memory(setup: Setup, quick: bool) -> Optional[dict[str, float]]:
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    out: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(setup.memory_repeats):
        for variant in VARIANTS:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", variant] + (["--quick"] if quick else [])
            env = dict(os.environ, **MALLOC_ENV)
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1]
            out[variant].append(json.loads(line)["peak_mib"])
    return {v: statistics.median(x) for v, x in out.items()}


# ---------------------------------------------------------------------- main
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        if names:
            cpu = f"{names[0]} x{len(names)}"
    except OSError:
        pass
    return f"{cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; Python {platform.python_version()}"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per workload")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument(
        "--only", default="train,infer,generate,merged", help="comma-separated workloads to time (default: all)"
    )
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="wall-clock time (default) or the process's CPU time (use with --threads 1 on a loaded machine)",
    )
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args.memory_worker, args.quick)
        return
    setup = QUICK if args.quick else Setup()
    if args.repeats:
        setup.repeats = args.repeats
        setup.gen_repeats = max(3, args.repeats // 2)

    import peft
    import transformers

    base = base_model(setup)
    models = {v: build(v, setup, base) for v in VARIANTS}
    work = {v: Workloads(v, m, setup) for v, m in models.items()}
    diff = check_equal(models, work["ours"])
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start")
    print(f"transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"config: {setup}")
    print(f"clock: {args.clock} ({torch.get_num_threads()} torch threads)")
    print(f"ours vs PEFT Poly logits (eval, mixed tasks): max relative difference {diff:.2e}")
    if diff > 1e-5:
        raise SystemExit("ours and PEFT Poly disagree: the timings would compare different computations")

    only = set(args.only.split(","))
    results: dict[str, Timings] = {}

    def timed(workload: str, variants: tuple[str, ...] = VARIANTS, **kwargs) -> Timings:
        for v in variants:
            work[v].set_mode(workload)
        return time_interleaved({v: getattr(work[v], workload) for v in variants}, **kwargs)

    if "train" in only:
        results["train"] = timed("train", repeats=setup.repeats)
    if "infer" in only:
        results["infer"] = timed("infer", repeats=setup.repeats)
    if "generate" in only:
        results["generate"] = timed("generate", repeats=setup.gen_repeats, warmup=1)
    if "merged" in only:
        models["ours"].merge_adapter(0)
        results["merged"] = timed("infer_single", ("ours", "base"), repeats=3 * setup.repeats)
        models["ours"].unmerge_adapter()
    memory = None if args.no_memory else measure_memory(setup, args.quick)

    def row(label: str, t: Timings) -> str:
        cells = [f"{1000 * t.median(v):9.1f}" if v in t else f"{'-':>9}" for v in VARIANTS]
        ratios = []
        for other in ("peft_poly", "peft_lora", "base"):
            ratios.append(f"{t.ratio('ours', other):6.2f}x" if other in t else f"{'-':>7}")
        return f"| {label:<22} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |"

    head = "| workload (ms, median)  | " + " | ".join(f"{v:>9}" for v in VARIANTS)
    head += " | ours/peft_poly | ours/peft_lora | ours/base |"
    print()
    print(head.replace("ours/peft_poly", "vs poly").replace("ours/peft_lora", "vs lora").replace("ours/base", "vs base"))
    print("|" + "---|" * (1 + len(VARIANTS) + 3))
    labels = {"train": "train step (mixed)", "infer": "inference (mixed)", "generate": "generate (mixed)",
              "merged": "inference, 1 merged"}
    for key, label in labels.items():
        if key in results:
            print(row(label, results[key]))
    if memory is not None:
        cells = [f"{memory[v]:9.1f}" for v in VARIANTS]
        ratios = [f"{memory['ours'] / memory[o]:6.2f}x" for o in ("peft_poly", "peft_lora", "base")]
        print(f"| {'train peak MiB':<22} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    print()
    print("times: medians over rounds; ratio columns: ours / other (lower is better), the median over rounds of the")
    print("ratio within a round; peft_lora serves one task (no routing). Per-round ratios, 25th-75th percentile:")
    for key, label in labels.items():
        if key in results:
            spread = []
            for other in ("peft_poly", "base"):
                if other in results[key] and len(results[key][other]) > 1:
                    q = statistics.quantiles(results[key].ratios("ours", other), n=4)
                    spread.append(f"vs {other} {q[0]:.2f}-{q[2]:.2f}")
            print(f"  {label}: " + ", ".join(spread))


if __name__ == "__main__":
    main()

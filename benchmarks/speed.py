"""Speed and memory of polytropon's Poly/MHR against the frozen base model, PEFT's LoRA and PEFT's Poly.

Usage::

    PYTHONPATH=src python benchmarks/speed.py                    # the goals, eager and compiled (tens of minutes on 2 cores)
    PYTHONPATH=src python benchmarks/speed.py --quick            # a smaller model, fewer repeats: a smoke run
    PYTHONPATH=src python benchmarks/speed.py --scaling          # ratios over tasks, distinct tasks, skills, rank, length
    PYTHONPATH=src python benchmarks/speed.py --device cuda      # on a GPU (default: cuda when available)

The model is a randomly initialised Llama-style causal LM (hidden 256, 4 layers, intermediate 688, 4 heads,
vocabulary 512) with all seven projections adapted: r 8, 8 skills, 4 splits (MHR), 8 tasks. Batches are
8 x 128 tokens with every example on a different task (mixed tasks). Four variants share the same base
weights, and ours and PEFT's Poly the same adapter weights (checked: their logits must agree to 1e-5):

* ``ours``       polytropon ``get_peft_model``
* ``peft_poly``  ``peft.get_peft_model`` with ``peft.PolyConfig``
* ``peft_lora``  ``peft.get_peft_model`` with ``peft.LoraConfig`` (r 8, same targets; one task only)
* ``base``       the frozen base model (training step: backward to the input embeddings, no weight grads)

and, in the compiled column, each of them under ``torch.compile`` (``--compile``, inductor by default): the
whole model for training and inference, the wrapped transformers model's ``forward`` for generation (``generate``
itself stays eager). The compiled base is the floor for a user who compiles. A variant that fails to compile
is reported "n/a" with the error; the number of graph breaks of each compiled variant is printed, and so is
any graph compiled during the timed rounds (the timings then include compilation). The compiled models share
code objects (transformers' forward decorator), so dynamo's recompile limit is raised and hitting it is an
error: past the limit dynamo would run a variant eagerly and time it as if compiled.

Timed workloads (``time.perf_counter``; on CUDA ``torch.cuda.synchronize()`` before and after each call):

* ``train``      forward + backward of the LM loss, ``model.train()``, gradients freed after each step
* ``infer``      forward under ``torch.no_grad()``, ``model.eval()``
* ``generate``   greedy ``generate``: batch 4, 32-token prompts, exactly 24 new tokens, KV cache on
* ``merged``     (ours only) forward with task 0 merged into the weights, timed against ``base`` on a
                 single-task batch
* ``many``       the training step and inference at 1,000 tasks, batch 32 with 32 distinct tasks

Each repeat runs every variant once, in an order rotated from repeat to repeat (interleaved), after
warm-up calls; the tables show medians over repeats and, as ratios, the median over repeats of the ratio
within a repeat (two variants timed back to back share the machine's state of the moment, so slow drifts of
its speed cancel), with the interquartile range of those per-repeat ratios in brackets. The goals table
prints each goal next to its ratio, eager and compiled, as "met" or "not met".

Peak memory of a training step: each variant runs in a fresh subprocess that builds the model and does
warm-up steps. On CUDA the peak is ``torch.cuda.max_memory_allocated()`` over one step minus the memory
allocated before it. On the CPU the subprocess resets the kernel's resident-set high-water mark
(``echo 5 > /proc/self/clear_refs``), records the current resident set, runs one step and reads ``VmHWM``
from ``/proc/self/status``; the subprocesses run with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``
so that glibc maps every tensor of 64 KiB or more separately and returns it when freed: the resident set then
follows the live tensors, instead of staying at whatever the allocator kept from the warm-up step
(``tracemalloc`` cannot see torch's allocations, and CPU torch has no allocator statistics). Linux only on the
CPU; the row is skipped elsewhere. Ours is also measured with ``recompute_inputs=False`` (every adapted layer
keeps its input for backward, instead of recomputing it from what the base keeps): the row "layer inputs kept"
of the ratio table, which is no goal but shows what recomputing the inputs saves.

``--scaling`` (a separate mode) varies one factor at a time around a centre configuration (batch 32, 100 tasks,
8 distinct tasks per batch, 8 skills, r 8, 128 tokens): tasks 10/100/1,000, distinct tasks per batch 1/8/32,
skills 2/8/32, rank 4/8/32, sequence length 32/128/512, and writes the eager training-step and inference ratios
of ours against the base, PEFT's Poly and PEFT's LoRA to ``scaling.md``, ``scaling.json`` and ``scaling.png``
(``scaling_quick.*`` with ``--quick``) under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
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
COMPILED = "+c"  # suffix of a compiled variant's name: "ours+c"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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
    #: distinct tasks in a batch (``None``: every example on a different task, up to ``n_tasks``)
    distinct: Optional[int] = None
    gen_batch: int = 4
    gen_prompt: int = 32
    gen_new: int = 24
    repeats: int = 25
    gen_repeats: int = 13
    memory_repeats: int = 3
    device: str = "cpu"


QUICK = Setup(hidden=128, layers=2, intermediate=344, vocab=256, seq=64, repeats=7, gen_repeats=3, gen_new=12, memory_repeats=1)
#: the many-task case of the goals: 1,000 tasks, a batch of 32 on 32 distinct tasks
MANY = {"n_tasks": 1000, "batch": 32, "distinct": 32}
#: the scaling sweep: its centre (on top of the model of ``Setup``/``QUICK``) and the values of each factor
SCALING_CENTRE = {"batch": 32, "n_tasks": 100, "distinct": 8, "n_skills": 8, "r": 8, "seq": 128}
SCALING = {"n_tasks": (10, 100, 1000), "distinct": (1, 8, 32), "n_skills": (2, 8, 32), "r": (4, 8, 32),
           "seq": (32, 128, 512)}
#: the goals: (label, result key, [(comparison variant, largest ratio ours / it that meets the goal)])
GOALS = [
    ("training step, mixed tasks", "train", [("base", 1.12)]),
    ("inference, mixed tasks", "infer", [("base", 1.08), ("peft_poly", 0.78)]),
    ("greedy generation, mixed tasks", "generate", [("base", 1.15), ("peft_lora", 1.00)]),
    ("training peak memory", "memory", [("base", 1.10)]),
    ("1,000 tasks, 32 distinct of 32: training", "many_train", [("base", 1.15)]),
    ("1,000 tasks, 32 distinct of 32: inference", "many_infer", [("base", 1.08)]),
]
NAMES = {"base": "base", "peft_lora": "PEFT LoRA", "peft_poly": "PEFT Poly"}
#: rows of the ratio table that are no goal: (label, result key); "memory_kept" is ours with
#: ``recompute_inputs=False`` (every adapted layer keeps its input for backward), measured like "memory"
INFO_ROWS = [("training peak memory, layer inputs kept", "memory_kept")]
#: the extra memory variant: ours with the layer inputs kept (see ``INFO_ROWS``)
KEPT = "ours_kept"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); nothing on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def base_model(setup: Setup, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=setup.vocab, hidden_size=setup.hidden, intermediate_size=setup.intermediate,
        num_hidden_layers=setup.layers, num_attention_heads=setup.heads, num_key_value_heads=setup.heads,
        max_position_embeddings=max(setup.seq, setup.gen_prompt + setup.gen_new) + 8, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).to(setup.device)


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
    return model.to(setup.device)


def transformers_model(variant: str, model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model inside a variant (whose ``forward`` ``generate`` calls at every step)."""
    if variant == "base":
        return model
    if variant == "ours":
        return model.model
    return model.base_model.model  # PEFT: PeftModel -> tuner model -> transformers model


def compile_generation(variant: str, model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """``model`` with its transformers model's ``forward`` compiled (``generate`` stays eager and calls it)."""
    inner = transformers_model(variant, model)
    inner.forward = torch.compile(inner.forward, backend=backend)
    return model


def task_layout(setup: Setup) -> torch.Tensor:
    """Task ids of a batch: ``distinct`` tasks drawn from ``n_tasks`` (seeded), assigned to rows in turn."""
    g = torch.Generator().manual_seed(2)
    k = min(setup.batch, setup.n_tasks) if setup.distinct is None else setup.distinct
    if not 1 <= k <= min(setup.batch, setup.n_tasks):
        raise ValueError(f"distinct tasks per batch must be in [1, min(batch, n_tasks)], got {k}")
    chosen = torch.randperm(setup.n_tasks, generator=g)[:k]
    return chosen[torch.arange(setup.batch) % k]


class Workloads:
    """The timed calls of one variant; every call returns nothing and leaves the model as it found it.

    With ``compile_backend`` the training and inference calls go through ``torch.compile(model)`` and
    generation through a copy of the model whose transformers ``forward`` is compiled.
    """

    def __init__(self, variant: str, model: torch.nn.Module, setup: Setup, compile_backend: Optional[str] = None) -> None:
        self.variant, self.model, self.setup = variant, model, setup
        self.compile_backend = compile_backend
        self.fwd = torch.compile(model, backend=compile_backend) if compile_backend else model
        self._gen: Optional[torch.nn.Module] = None
        dev = setup.device
        g = torch.Generator().manual_seed(3)
        self.input_ids = torch.randint(3, setup.vocab, (setup.batch, setup.seq), generator=g).to(dev)
        self.task_ids = task_layout(setup).to(dev)
        self.prompt = torch.randint(3, setup.vocab, (setup.gen_batch, setup.gen_prompt), generator=g).to(dev)
        self.gen_tasks = self.task_ids[: setup.gen_batch]

    @property
    def gen(self) -> torch.nn.Module:
        """The model ``generate`` is called on (a copy with a compiled forward when compiling)."""
        if self._gen is None:
            if self.compile_backend:
                self._gen = compile_generation(self.variant, copy.deepcopy(self.model), self.compile_backend)
            else:
                self._gen = self.model
        return self._gen

    def _kw(self, task_ids: torch.Tensor) -> dict:
        return {} if self.variant in ("base", "peft_lora") else {"task_ids": task_ids}

    #: the mode each workload needs, set by :meth:`set_mode` before the timed calls (``Module.train()`` walks every
    #: submodule: timing it would charge the adapters' extra modules to every call)
    MODES = {"train": True, "infer": False, "infer_single": False, "generate": False}

    def set_mode(self, workload: str) -> None:
        (self.gen if workload == "generate" else self.model).train(self.MODES[workload])

    def train(self) -> None:
        m = self.fwd
        if self.variant == "base":
            embeds = self.model.get_input_embeddings()(self.input_ids).detach().requires_grad_(True)
            loss = m(inputs_embeds=embeds, labels=self.input_ids).loss
        else:
            loss = m(input_ids=self.input_ids, labels=self.input_ids, **self._kw(self.task_ids)).loss
        loss.backward()
        for p in self.model.parameters():
            p.grad = None

    def infer(self) -> None:
        with torch.no_grad():
            self.fwd(input_ids=self.input_ids, **self._kw(self.task_ids))

    def infer_single(self) -> None:
        """Single-task batch (task 0), for the merged comparison; ``ours`` must have task 0 merged."""
        with torch.no_grad():
            self.fwd(input_ids=self.input_ids)

    def generate(self) -> None:
        s = self.setup
        out = self.gen.generate(
            input_ids=self.prompt, attention_mask=torch.ones_like(self.prompt), max_new_tokens=s.gen_new,
            min_new_tokens=s.gen_new, do_sample=False, pad_token_id=0, **self._kw(self.gen_tasks),
        )
        assert out.shape[1] == s.gen_prompt + s.gen_new


def check_equal(a: torch.nn.Module, b: torch.nn.Module, w: Workloads) -> float:
    """Max relative difference between two routed models' logits (eval, mixed tasks)."""
    outs = []
    for m in (a, b):
        m.eval()
        with torch.no_grad():
            outs.append(m(input_ids=w.input_ids, task_ids=w.task_ids).logits)
    return float((outs[0] - outs[1]).abs().max() / outs[1].abs().max())


class Timings(dict):
    """Seconds (or MiB) per round of every call: ``{name: [t_round_0, t_round_1, ...]}``."""

    def median(self, name: str) -> float:
        return statistics.median(self[name])

    def ratios(self, name: str, other: str) -> list[float]:
        """``t_name / t_other`` round by round (the two ran back to back in every round), sorted."""
        return sorted(a / b for a, b in zip(self[name], self[other]))

    def ratio(self, name: str, other: str) -> float:
        """Median over rounds of the per-round ratio: slow drifts of the machine's speed cancel within a round."""
        return statistics.median(self.ratios(name, other))

    def iqr(self, name: str, other: str) -> Optional[tuple[float, float]]:
        """25th and 75th percentile of the per-round ratios (``None`` with fewer than two rounds)."""
        r = self.ratios(name, other)
        if len(r) < 2:
            return None
        q = statistics.quantiles(r, n=4, method="inclusive")
        return q[0], q[2]


#: the clock of the timings: wall-clock (``time.perf_counter``) or the process's CPU time (``--clock cpu``)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def time_interleaved(calls: dict[str, Callable[[], None]], repeats: int, warmup: int = 2, device: str = "cpu") -> Timings:
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
            sync(device)
            t0 = clock()
            calls[name]()
            sync(device)
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


def memory_worker(variant: str, quick: bool, device: str, backend: Optional[str]) -> None:
    """Print the peak extra memory (MiB) of one training step of ``variant`` as JSON (see the module docstring)."""
    setup = dataclasses.replace(QUICK if quick else Setup(), device=device)
    model = build("ours" if variant == KEPT else variant, setup)
    if variant == KEPT:
        model.recompute_inputs = False
    w = Workloads("ours" if variant == KEPT else variant, model, setup, backend)
    w.set_mode("train")
    for _ in range(3 if backend else 1):  # warm-up: lazy initialisations, allocator pools, compilation
        w.train()
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        w.train()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current resident set
        before = _status_kb("VmRSS")
        w.train()
        peak_mib = (_status_kb("VmHWM") - before) / 1024
    print(json.dumps({"variant": variant, "peak_mib": peak_mib}))


def measure_memory(setup: Setup, quick: bool, backend: Optional[str]) -> tuple[Optional[Timings], dict[str, str]]:
    """Peak training-step memory of every variant (and compiled variant, with ``backend``), round by round.

    Returns the MiB per round (a :class:`Timings`, so that ratios are per round) and the reason of every
    variant that could not be measured.
    """
    if not setup.device.startswith("cuda") and not os.path.exists("/proc/self/clear_refs"):
        return None, {}
    jobs = [(v, None) for v in VARIANTS + (KEPT,)] + ([(v, backend) for v in VARIANTS] if backend else [])
    out = Timings({v + (COMPILED if b else ""): [] for v, b in jobs})
    failed: dict[str, str] = {}
    for _ in range(setup.memory_repeats):
        for variant, b in jobs:
            name = variant + (COMPILED if b else "")
            if name in failed:
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", variant, "--device", setup.device]
            cmd += (["--quick"] if quick else []) + ["--compile", b or "none"]
            env = dict(os.environ, **MALLOC_ENV)
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode != 0 or not lines:
                err = (res.stderr.strip().splitlines() or ["no output"])[-1]
                failed[name] = err[:100]
                continue
            out[name].append(json.loads(lines[-1])["peak_mib"])
    for name in failed:
        out.pop(name, None)
    return out, failed


# ---------------------------------------------------------------------- the eval cache at many tasks
def cache_report(setup: Setup) -> list[str]:
    """Hit rate and size of the eval-mixture cache over ``generate`` calls at ``setup``'s task count.

    Counts the adapted layers' calls (``PolyLayer.forward``) and, among them, those where an adapter mixed its
    skills with autograd off (a miss; every other call reuses a mixture: from the adapter's cache, or from the
    call's eval step while decoding), by wrapping ``PolyLayer.forward`` and ``PolyAdapter.mix`` for the duration;
    then sums the bytes the caches hold. Reads the layer's private cache on purpose: this is a measurement of it.
    """
    from polytropon import layer as poly_layer

    cls, layer_cls = getattr(poly_layer, "PolyAdapter", None), getattr(poly_layer, "PolyLayer", None)
    if cls is None or layer_cls is None or not hasattr(cls, "mix"):
        return ["eval cache: n/a (polytropon.layer has no PolyLayer / PolyAdapter.mix to observe)"]
    model = build("ours", setup)
    model.eval()
    counts = {"calls": 0, "mixes": 0}
    orig_forward, orig_mix = layer_cls.forward, cls.mix

    def forward(self, *args, **kwargs):
        counts["calls"] += 1
        return orig_forward(self, *args, **kwargs)

    def mix(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            counts["mixes"] += 1
        return orig_mix(self, *args, **kwargs)

    g = torch.Generator().manual_seed(4)
    n = setup.batch
    prompt = torch.randint(3, setup.vocab, (n, setup.gen_prompt), generator=g).to(setup.device)
    first = task_layout(setup).to(setup.device)
    other = (first + setup.n_tasks // 2) % setup.n_tasks
    adapters = [m for m in model.modules() if isinstance(m, cls)]
    lines = [f"eval cache at {setup.n_tasks} tasks: greedy generation, batch {n} on {len(first.unique())} distinct "
             f"tasks, {setup.gen_prompt}-token prompts, {setup.gen_new} new tokens, {len(adapters)} adapted layers"]
    layer_cls.forward, cls.mix = forward, mix
    try:
        for label, ids in (("first call", first), ("same tasks again", first), ("other tasks", other)):
            counts.update(calls=0, mixes=0)
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=setup.gen_new,
                           min_new_tokens=setup.gen_new, do_sample=False, pad_token_id=0, task_ids=ids)
            calls, misses = counts["calls"], counts["mixes"]
            rate = 1 - misses / calls if calls else float("nan")
            lines.append(f"  {label}: {calls} layer calls, {misses} mixings, hit rate {rate:.3f}")
    finally:
        layer_cls.forward, cls.mix = orig_forward, orig_mix
    held, seen = 0, set()
    for a in adapters:
        for t in getattr(a, "_cache", None) or ():
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                held += t.numel() * t.element_size()
    per_task = sum(a.r * (a.in_features + a.out_features) for a in adapters) * 4
    k = len(first.unique())
    lines.append(f"  held after generating: {held / 2**20:.2f} MiB in all layers (one entry per layer); bound "
                 f"(k + n) r (in + out) per layer = {(k + n) * per_task / 2**20:.2f} MiB for k={k} distinct tasks "
                 f"and n={n} rows; all {setup.n_tasks} tasks mixed would be {setup.n_tasks * per_task / 2**20:.2f} MiB")
    return lines


# ---------------------------------------------------------------------- printing
def machine(device: str = "cpu") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        if names:
            cpu = f"{names[0]} x{len(names)}"
    except OSError:
        pass
    gpu = f"; GPU {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if device.startswith("cuda") else ""
    return f"{cpu}{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; Python {platform.python_version()}"


def fmt_ratio(t: Optional[Timings], name: str, other: str) -> Optional[str]:
    """``"1.20x [1.15-1.25]"``: the median per-round ratio and its interquartile range (``None`` if not measured)."""
    if t is None or name not in t or other not in t or not t[name] or not t[other]:
        return None
    iqr = t.iqr(name, other)
    return f"{t.ratio(name, other):.2f}x" + (f" [{iqr[0]:.2f}-{iqr[1]:.2f}]" if iqr else "")


def goals_report(results: dict[str, Timings], compiled: bool, reasons: dict[str, str]) -> list[str]:
    """The ratio table (eager and compiled columns) and the goals, each with "met"/"not met"."""
    modes = [("eager", "")] + ([("compiled", COMPILED)] if compiled else [])

    def cell(key: str, other: str, suffix: str) -> str:
        got = fmt_ratio(results.get(key), "ours" + suffix, other + suffix)
        if got is not None:
            return got
        return "n/a (see below)" if reasons else "n/a"

    lines = ["| workload | " + " | ".join(f"ours / {NAMES[o]}, {m}" for o in ("base", "peft_lora", "peft_poly")
                                           for m, _ in modes) + " |"]
    lines.append("|---|" + "---:|" * (3 * len(modes)))
    for label, key in [(label, key) for label, key, _ in GOALS] + INFO_ROWS:
        if key in results:
            lines.append(f"| {label} | " + " | ".join(cell(key, o, s) for o in ("base", "peft_lora", "peft_poly")
                                                      for _, s in modes) + " |")
    lines += ["", "| goal | " + " | ".join(m for m, _ in modes) + " |", "|---|" + "---|" * len(modes)]
    for label, key, targets in GOALS:
        if key not in results:
            continue
        for other, limit in targets:
            cells = []
            for _, s in modes:
                t = results[key]
                if "ours" + s in t and other + s in t and t["ours" + s] and t[other + s]:
                    r = t.ratio("ours" + s, other + s)
                    cells.append(f"{fmt_ratio(t, 'ours' + s, other + s)} {'met' if r <= limit else 'not met'}")
                else:
                    cells.append("n/a")
            lines.append(f"| {label}: ours / {NAMES[other]} <= {limit:.2f}x | " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------- the goals run
def prepare(names: list[str], work: dict[str, Workloads], workload: str, reasons: dict[str, str]) -> list[str]:
    """Set the mode of each variant and make one call (the compiled variants compile here); drop failures."""
    from torch._dynamo.utils import counters

    kept = []
    for name in names:
        if name in reasons:
            continue
        w = work[name]
        try:
            w.set_mode(workload)
            before = sum(counters["graph_break"].values())
            getattr(w, workload)()
            breaks = sum(counters["graph_break"].values()) - before
            if breaks and name.endswith(COMPILED):
                reasons.setdefault(f"graph breaks: {name}", str(breaks))
        except Exception as exc:  # a variant that does not compile is reported, not fatal
            reasons[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
            continue
        kept.append(name)
    return kept


def allow_recompiles() -> contextlib.AbstractContextManager:
    """A context in which every compiled variant keeps its own graphs, and running one eagerly instead is an error.

    The variants' forwards share code objects (transformers wraps ``LlamaForCausalLM.forward`` and others in one
    decorator function), and dynamo keeps at most ``recompile_limit`` (8) graphs per code object; past that it
    runs the frame eagerly with only a logged warning, and a "compiled" variant compiled last would be timed as
    eager. Raised for the benchmark's dozen or so compiled models, and reaching it raises (the variant is reported
    "n/a"); dynamo's settings are restored on exit.
    """
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True)


def run_goals(args: argparse.Namespace, setup: Setup) -> None:
    import peft
    import transformers

    backend = None if args.compile == "none" else args.compile
    compiled_variants = VARIANTS if backend and not args.quick else (("ours", "base") if backend else ())
    reasons: dict[str, str] = {}
    if backend and args.quick:
        for v in ("peft_poly", "peft_lora"):
            reasons[v + COMPILED] = "not compiled in --quick"

    def variants_for(s: Setup) -> tuple[dict[str, torch.nn.Module], dict[str, Workloads]]:
        base = base_model(s)
        models = {v: build(v, s, base) for v in VARIANTS}
        work = {v: Workloads(v, m, s) for v, m in models.items()}
        for v in compiled_variants:
            work[v + COMPILED] = Workloads(v, build(v, s, base), s, backend)
        return models, work

    models, work = variants_for(setup)
    diff = check_equal(models["ours"], models["peft_poly"], work["ours"])
    print(f"machine: {machine(setup.device)}; load average {os.getloadavg()[0]:.2f} at start")
    print(f"device {setup.device}; transformers {transformers.__version__}, peft {peft.__version__}; "
          f"compile: {backend or 'off'}")
    print(f"config: {setup}")
    print(f"ours vs PEFT Poly logits (eval, mixed tasks): max relative difference {diff:.2e}")
    if diff > 1e-5:
        raise SystemExit("ours and PEFT Poly disagree: the timings would compare different computations")

    only = set(args.only.split(","))
    results: dict[str, Timings] = {}

    def timed(work: dict[str, Workloads], workload: str, names: list[str], key: str, **kwargs) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {key}: warm-up (and compilation), then timing", file=sys.stderr, flush=True)
        from torch._dynamo.utils import counters

        kept = prepare(names, work, workload, reasons)
        calls = {n: getattr(work[n], workload) for n in kept}
        for call in calls.values():  # a second warm-up: recompilations for the shapes of later calls
            call()
        graphs = counters["stats"]["unique_graphs"]
        results[key] = time_interleaved(calls, warmup=0, device=setup.device, **kwargs)
        if counters["stats"]["unique_graphs"] > graphs:  # the timings include compilation: say so
            reasons[f"recompiled while timing {key}"] = f"{counters['stats']['unique_graphs'] - graphs} graph(s)"

    everything = list(VARIANTS) + [v + COMPILED for v in compiled_variants]
    if "train" in only:
        timed(work, "train", everything, "train", repeats=setup.repeats)
    if "infer" in only:
        timed(work, "infer", everything, "infer", repeats=setup.repeats)
    if "generate" in only:
        timed(work, "generate", everything, "generate", repeats=setup.gen_repeats)
    if "merged" in only:
        models["ours"].merge_adapter(0)
        timed(work, "infer_single", ["ours", "base"], "merged", repeats=3 * setup.repeats)
        models["ours"].unmerge_adapter()
    if "many" in only:
        many = dataclasses.replace(setup, **MANY, seq=min(setup.seq, 32) if args.quick else setup.seq)
        del models, work
        _, many_work = variants_for(many)
        timed(many_work, "train", everything, "many_train", repeats=setup.repeats)
        timed(many_work, "infer", everything, "many_infer", repeats=setup.repeats)
        del many_work
    if not args.no_memory:
        memory, failed = measure_memory(setup, args.quick, None if args.quick else backend)
        reasons.update({k: f"memory: {v}" for k, v in failed.items()})
        if args.quick and backend:
            reasons["memory, compiled"] = "not measured in --quick"
        if memory is not None:
            results["memory"] = memory
            if memory.get(KEPT):  # ours keeping every layer input, against the same rounds of the others
                results["memory_kept"] = Timings({**{v: memory[v] for v in VARIANTS if v in memory}, "ours": memory[KEPT]})

    labels = {"train": "train step (mixed)", "infer": "inference (mixed)", "generate": "generate (mixed)",
              "merged": "inference, 1 merged", "many_train": "1000 tasks: train", "many_infer": "1000 tasks: infer",
              "memory": "train peak MiB", "memory_kept": "peak MiB, inputs kept"}

    def row(label: str, t: Timings, suffix: str) -> str:
        scale = 1 if "MiB" in label else 1000
        cells = [f"{scale * t.median(v + suffix):9.1f}" if t.get(v + suffix) else f"{'-':>9}" for v in VARIANTS]
        ratios = [f"{t.ratio('ours' + suffix, o + suffix):6.2f}x" if t.get('ours' + suffix) and t.get(o + suffix)
                  else f"{'-':>7}" for o in ("peft_poly", "peft_lora", "base")]
        return f"| {label:<22} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |"

    for title, suffix in (("eager", ""), ("compiled", COMPILED)):
        if suffix and not compiled_variants:
            continue
        print()
        print(f"{title}: ms (MiB for memory), median over rounds; ratios ours / other")
        print("| workload (median)      | " + " | ".join(f"{v:>9}" for v in VARIANTS) + " | vs poly | vs lora | vs base |")
        print("|" + "---|" * (1 + len(VARIANTS) + 3))
        for key, label in labels.items():
            if key in results and (not suffix or any(n.endswith(COMPILED) for n in results[key])):
                print(row(label, results[key], suffix))
    print()
    print("ratios: median over rounds of ours / other within a round [25th-75th percentile of those per-round")
    print("ratios]; lower is better; PEFT LoRA serves one task (no routing); compiled columns compare compiled with")
    print(f"compiled ({backend or 'off'}); memory: {setup.memory_repeats} round(s), the compiled row "
          f"{'not measured in --quick' if args.quick else 'measured'}.")
    print()
    for line in goals_report(results, bool(compiled_variants), reasons):
        print(line)
    if reasons:
        print()
        for name, why in sorted(reasons.items()):
            print(f"  {name}: {why}")
    if "merged" in results:
        print(f"\none merged task vs base (single-task batch): {fmt_ratio(results['merged'], 'ours', 'base')}")
    if "many" in only and not args.no_cache_report:
        print()
        for line in cache_report(dataclasses.replace(setup, **MANY)):
            print(line)


# ---------------------------------------------------------------------- the products' floor
def adapted_shapes(setup: Setup) -> list[tuple[int, int]]:
    """``(in, out)`` of every adapted projection of the benchmark's model (``TARGETS`` in each layer)."""
    h, i = setup.hidden, setup.intermediate
    return [(h, h)] * 4 * setup.layers + [(h, i)] * 2 * setup.layers + [(i, h)] * setup.layers


def median_seconds(fn: Callable[[], None], repeats: int, inner: int = 20) -> float:
    """Median over ``repeats`` of the mean time of ``inner`` back-to-back calls (operands stay in cache)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(inner):
            fn()
        times.append((clock() - t0) / inner)
    return statistics.median(times)


def products_seconds(setup: Setup, n: int, t: int, training: bool, repeats: int) -> float:
    """Time of the adapter's rank-``r`` products alone, summed over the model's adapted projections.

    Per projection, in the layouts the eager kernels use (``x (n, t, in)``, ``A^T (n, r, in)``, ``B (n, r, out)``):
    forward ``h^T = A^T x^T`` and ``y += h B``; in training also ``dh^T = B g^T``, ``dx += dh A^T``,
    ``dA^T = dh^T x`` and ``dB = h^T g``. The operands are reused call after call, so they are in the caches:
    a lower bound on what these products cost inside the model, where the inputs come from memory.
    """
    dev, r = setup.device, setup.r
    total = 0.0
    for (d_in, d_out), count in sorted(collections.Counter(adapted_shapes(setup)).items()):
        x, g = torch.randn(n, t, d_in, device=dev), torch.randn(n, t, d_out, device=dev)
        a_t, b = torch.randn(n, r, d_in, device=dev), torch.randn(n, r, d_out, device=dev)
        y, dx = torch.zeros(n, t, d_out, device=dev), torch.zeros(n, t, d_in, device=dev)

        def forward() -> torch.Tensor:
            h_t = torch.bmm(a_t, x.transpose(1, 2))
            y.baddbmm_(h_t.transpose(1, 2), b)
            return h_t

        def step() -> None:
            h_t = forward()
            if training:
                dh_t = torch.bmm(b, g.transpose(1, 2))
                dx.baddbmm_(dh_t.transpose(1, 2), a_t)
                torch.bmm(dh_t, x)
                torch.bmm(h_t, g)
            sync(dev)

        total += count * median_seconds(step, repeats)
    return total


def floor_report(setup: Setup, repeats: int) -> list[str]:
    """The rank-``r`` products' share of the base model's time: how low ours / base can go with these GEMMs."""
    base = base_model(setup)
    lines = ["the adapter's rank-r products alone (hot caches, the eager kernels' layouts) against the frozen base:",
             "| workload | base ms | products ms | base + products / base | FLOPs: products / base linears |",
             "|---|---:|---:|---:|---:|"]
    linear_flops = sum(d_in * d_out for d_in, d_out in adapted_shapes(setup))
    product_flops = sum(setup.r * (d_in + d_out) for d_in, d_out in adapted_shapes(setup))
    # per row: forward 2 products against 1 GEMM per linear; training 6 against 2 (forward and dx; frozen weights)
    flops_share = {"train": 3 * product_flops / (2 * linear_flops), "infer": product_flops / linear_flops}
    for label, s in (("8 tasks", setup), ("1,000 tasks, 32 of 32", dataclasses.replace(setup, **MANY))):
        work = Workloads("base", build("base", s, base), s)
        for workload, training in (("train", True), ("infer", False)):
            work.set_mode(workload)
            base_s = statistics.median(time_interleaved({"base": getattr(work, workload)}, repeats)["base"])
            prod_s = products_seconds(s, s.batch, s.seq, training, repeats)
            lines.append(f"| {workload}, {label} | {1000 * base_s:.1f} | {1000 * prod_s:.1f} | "
                         f"{(base_s + prod_s) / base_s:.2f}x | {flops_share[workload]:.3f} |")
    lines.append("(FLOPs: training counts 6 products per projection against the frozen linear's 2 GEMMs, forward and "
                 "dx; the base's time also holds attention, norms and the lm head, which the FLOPs column leaves out.)")
    return lines + [""] + fixed_cost_report(setup, 2 * repeats + 1)


def fixed_cost_report(setup: Setup, repeats: int) -> list[str]:
    """Time per adapted layer above the base that does not grow with the data: the model with every width tiny.

    The benchmark's model (same layers, same adapted projections, same tasks) at hidden 16, 4 tokens, vocabulary 32:
    the products are then a few hundred FLOPs, and what ours and PEFT's LoRA cost above the base is the cost of their
    operations and code per layer and call, whatever the sizes.
    """
    tiny = dataclasses.replace(setup, hidden=16, intermediate=16, heads=2, vocab=32, seq=4)
    base = base_model(tiny)
    work = {v: Workloads(v, build(v, tiny, base), tiny) for v in ("base", "ours", "peft_lora")}
    kept = Workloads("ours", build("ours", tiny, base), tiny)
    kept.model.recompute_inputs = False
    work[KEPT] = kept
    layers = len(adapted_shapes(tiny))
    lines = [f"fixed cost per adapted layer and call ({layers} layers at hidden 16, {tiny.batch} x 4 tokens; "
             f"{repeats} interleaved rounds), microseconds above the base:",
             "| workload | ours | ours, layer inputs kept | PEFT LoRA |", "|---|---:|---:|---:|"]
    for workload in ("train", "infer"):
        for w in work.values():
            w.set_mode(workload)
        t = time_interleaved({v: getattr(w, workload) for v, w in work.items()}, repeats, device=tiny.device)
        above = {v: 1e6 * (t.median(v) - t.median("base")) / layers for v in ("ours", KEPT, "peft_lora")}
        lines.append(f"| {workload} | {above['ours']:.0f} | {above[KEPT]:.0f} | {above['peft_lora']:.0f} |")
    return lines


# ---------------------------------------------------------------------- the scaling sweep
def scaling_points(centre: Setup) -> list[tuple[str, int, Setup]]:
    """One factor at a time around ``centre``: ``(factor, value, setup)`` for every value of every factor."""
    return [(f, v, dataclasses.replace(centre, **{f: v})) for f, values in SCALING.items() for v in values]


def run_scaling(setup: Setup, out: str, repeats: int, stem: str = "scaling") -> dict:
    """Measure the sweep around ``setup`` with :data:`SCALING_CENTRE`, write ``<stem>.{json,md,png}`` under ``out``.

    Eager only (a compiled sweep would compile every variant at every point). Returns the JSON document:
    ``{"factors": {factor: [{"value": v, "train": {other: {"ratio": r, "iqr": [q1, q3]}, ..., "ms": {...}},
    "infer": {...}}, ...]}, ...}`` for every factor of :data:`SCALING` and every value.
    """
    centre = dataclasses.replace(setup, **SCALING_CENTRE)
    cache: dict[tuple, dict] = {}
    doc = {"machine": machine(setup.device), "load_average_at_start": os.getloadavg()[0], "device": setup.device,
           "clock": "CPU time of the process" if clock is time.process_time else "wall-clock time",
           "threads": torch.get_num_threads(),
           "centre": dataclasses.asdict(centre), "repeats": repeats, "mode": "eager",
           "ratio": "median over rounds of ours / other within a round, with the 25th and 75th percentile",
           "factors": {}}
    print(f"machine: {doc['machine']}; load average {doc['load_average_at_start']:.2f} at start")
    for factor, value, s in scaling_points(centre):
        key = tuple(sorted(dataclasses.asdict(s).items()))
        if key not in cache:
            base = base_model(s)
            work = {v: Workloads(v, build(v, s, base), s) for v in VARIANTS}
            point: dict = {}
            for workload in ("train", "infer"):
                for w in work.values():
                    w.set_mode(workload)
                t = time_interleaved({v: getattr(w, workload) for v, w in work.items()}, repeats=repeats, warmup=1,
                                     device=s.device)
                point[workload] = {
                    other: {"ratio": t.ratio("ours", other), "iqr": t.iqr("ours", other)}
                    for other in ("base", "peft_poly", "peft_lora")
                }
                point[workload]["ms"] = {v: 1000 * t.median(v) for v in VARIANTS}
            cache[key] = point
            del work, base
        doc["factors"].setdefault(factor, []).append({"value": value, **cache[key]})
        p = cache[key]
        print(f"  {factor}={value}: train vs base {p['train']['base']['ratio']:.2f}x, infer vs base "
              f"{p['infer']['base']['ratio']:.2f}x", flush=True)
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, stem)
    with open(stem + ".json.tmp", "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(stem + ".json.tmp", stem + ".json")
    md = scaling_markdown(doc)
    with open(stem + ".md", "w") as fh:
        fh.write(md)
    plot_scaling(doc, stem + ".png")
    print()
    print(md)
    print(f"written: {stem}.json, {stem}.md, {stem}.png")
    return doc


def scaling_markdown(doc: dict) -> str:
    c = doc["centre"]
    head = (f"Scaling, {doc['mode']}, {doc['device']}: one factor at a time around batch {c['batch']}, {c['n_tasks']} tasks, "
            f"{c['distinct']} distinct per batch, {c['n_skills']} skills, r {c['r']}, {c['seq']} tokens "
            f"(hidden {c['hidden']}, {c['layers']} layers); {doc['repeats']} interleaved rounds; ratios ours / other, "
            f"median [25th-75th percentile]. Machine: {doc['machine']}. Timed: {doc.get('clock', 'wall-clock time')}, "
            f"{doc.get('threads', '?')} torch thread(s); load average {doc['load_average_at_start']:.2f} at start.\n\n")
    cols = [(w, o) for w in ("train", "infer") for o in ("base", "peft_poly", "peft_lora")]
    lines = ["| factor | value | " + " | ".join(f"{w}: ours / {NAMES[o]}" for w, o in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]

    def cell(x: dict) -> str:
        return f"{x['ratio']:.2f}x" + (f" [{x['iqr'][0]:.2f}-{x['iqr'][1]:.2f}]" if x["iqr"] else "")

    for factor, points in doc["factors"].items():
        for p in points:
            lines.append(f"| {factor} | {p['value']} | " + " | ".join(cell(p[w][o]) for w, o in cols) + " |")
    return head + "\n".join(lines) + "\n"


def plot_scaling(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = list(doc["factors"])
    fig, axes = plt.subplots(1, len(factors), figsize=(4 * len(factors), 3.6), sharey=True)
    colours = {"base": "tab:blue", "peft_poly": "tab:orange", "peft_lora": "tab:green"}
    for ax, factor in zip(axes, factors):
        points = doc["factors"][factor]
        xs = [p["value"] for p in points]
        for workload, style in (("train", "-"), ("infer", "--")):
            for other, colour in colours.items():
                ax.plot(xs, [p[workload][other]["ratio"] for p in points], style, marker="o", color=colour,
                        label=f"{workload}: ours / {NAMES[other]}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel(factor)
        ax.set_title(factor)
    axes[0].set_ylabel("time ratio ours / other (lower is better)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"polytropon scaling ({doc['mode']}, {doc['device']}): one factor at a time around the centre", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats (a smoke run)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device(),
                        help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--compile", default=None, choices=("inductor", "aot_eager", "none"),
                        help="torch.compile backend of the compiled column (default: inductor; aot_eager with --quick, "
                             "which then compiles ours and the base only)")
    parser.add_argument("--scaling", action="store_true", help="run the scaling sweep instead of the goals")
    parser.add_argument("--out", default=RESULTS, help="directory of the scaling sweep's files")
    parser.add_argument("--floor", action="store_true",
                        help="print only the rank-r products' share of the base's time (a lower bound of ours / base) "
                             "and the fixed cost per adapted layer (the model at tiny widths)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-cache-report", action="store_true", help="skip the eval-cache report")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per workload")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="wall-clock time (default) or the process's CPU time (use with --threads 1 on a loaded machine)",
    )
    parser.add_argument(
        "--only", default="train,infer,generate,merged,many", help="comma-separated workloads to time (default: all)"
    )
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if args.compile is None:
        args.compile = "aot_eager" if args.quick else "inductor"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args.memory_worker, args.quick, args.device, None if args.compile == "none" else args.compile)
        return
    setup = dataclasses.replace(QUICK if args.quick else Setup(), device=args.device)
    if args.repeats:
        setup.repeats = args.repeats
        setup.gen_repeats = max(3, args.repeats // 2)
    if args.floor:
        print("\n".join(floor_report(setup, args.repeats or (3 if args.quick else 7))))
    elif args.scaling:
        run_scaling(setup, args.out, args.repeats or (3 if args.quick else 7), "scaling_quick" if args.quick else "scaling")
    else:
        with allow_recompiles():
            run_goals(args, setup)


if __name__ == "__main__":
    main()

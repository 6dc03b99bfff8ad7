"""One eval-mode model called from many threads and asyncio tasks at once: every call gets exactly its own tasks.

Each concurrent call is compared with the same call made alone (sequentially, before any concurrency), on
adapters with random non-zero weights whose tasks give clearly different outputs -- a call routed with another
call's tasks, or with none, fails the comparison (or raises).
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import threading
from contextlib import nullcontext
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch
from tests.helpers import batch_inputs, randomize_, tiny_llama, tiny_t5

from polytropon import PolyConfig, get_peft_model

N_THREADS = 6
N_TASKS = 4
TOL = dict(rtol=1e-5, atol=1e-6)


def build(kind: str = "llama", **config) -> torch.nn.Module:
    base = tiny_llama(seed=3) if kind == "llama" else tiny_t5(seed=3)
    cfg = dict(r=4, n_tasks=N_TASKS, n_skills=3, init_weights=False)
    cfg.update(config)
    model = get_peft_model(base, PolyConfig(**cfg))
    randomize_(model, seed=11)
    return model.eval()


@dataclass(frozen=True)
class Job:
    """One call: ``forward`` (logits), or ``generate`` with ``beams`` beams (sequences and scores); ``ids`` its
    task ids (one per example, or one for the batch)."""

    kind: str
    batch: int
    ids: tuple[int, ...]
    beams: int = 1
    seed: int = 0

    def inputs(self, model_kind: str) -> dict:
        inputs = batch_inputs(model_kind, batch=self.batch, length=6, seed=self.seed)
        if self.kind == "generate":
            inputs.pop("decoder_input_ids", None)
        return inputs


def run(model, job: Job, model_kind: str, how: str = "explicit"):
    """Run ``job`` on ``model``: ``how`` is "explicit" (``task_ids=``), "context" (``task_context`` around the
    PolyModel call) or "base" (``task_context`` around a direct call of the base model)."""
    inputs = job.inputs(model_kind)
    target = model.get_base_model() if how == "base" else model
    kwargs = {"task_ids": list(job.ids)} if how == "explicit" else {}
    scope = model.task_context(list(job.ids)) if how != "explicit" else nullcontext()
    with scope, torch.no_grad():
        if job.kind == "forward":
            return target(**inputs, **kwargs).logits
        return _generated(target.generate(**inputs, **kwargs, **GENERATE, num_beams=job.beams))


GENERATE = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)


def _generated(out) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sequences, scores of every step (steps, rows, vocab))`` of a ``generate`` call."""
    return out.sequences, torch.stack(out.scores)


JOBS = [
    Job("forward", 4, (2,)),  # one id for the whole batch
    Job("forward", 4, (1, 1, 1, 1), seed=1),  # single-task batch, one id per example
    Job("forward", 4, (0, 3, 1, 3), seed=2),  # mixed
    Job("forward", 3, (3, 2, 0), seed=3),
    Job("forward", 1, (0,), seed=4),
    Job("generate", 3, (2, 0, 1), seed=5),  # greedy, mixed
    Job("generate", 2, (3,), seed=6),  # greedy, one task
    Job("generate", 2, (1, 3), beams=3, seed=7),  # beams, mixed
    Job("generate", 2, (0, 0), beams=2, seed=8),  # beams, one task
]


def compare(got, want, job: Job) -> None:
    """Logits (forward) or scores to ``TOL``; generated sequences exactly."""
    if job.kind == "forward":
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{job}: {m}")
    else:
        assert torch.equal(got[0], want[0]), f"{job}: {got[0].tolist()} != {want[0].tolist()}"
        torch.testing.assert_close(got[1], want[1], **TOL, msg=lambda m: f"{job}: {m}")


def distance(a, b) -> float:
    """Largest difference of two outputs (logits, or the first step's finite scores of a generation)."""
    if isinstance(a, tuple):
        a, b = a[1][0], b[1][0]
        finite = torch.isfinite(a) & torch.isfinite(b)
        a, b = a[finite], b[finite]
    return float((a - b).abs().max())


def references(model, jobs, model_kind: str) -> dict[Job, torch.Tensor]:
    refs = {job: run(model, job, model_kind) for job in jobs}
    # the tasks matter: the same inputs routed to other tasks give other outputs (else nothing below could fail)
    for job in jobs:
        other = Job(job.kind, job.batch, tuple((t + 1) % N_TASKS for t in job.ids), job.beams, job.seed)
        assert distance(run(model, other, model_kind), refs[job]) > 1e-2, job
    return refs


def in_threads(n: int, work) -> list:
    """``work(i)`` for ``i < n`` in ``n`` threads started together; returns their results, re-raises errors."""
    barrier = threading.Barrier(n)

    def start(i):
        barrier.wait(timeout=60)
        return work(i)

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(start, i) for i in range(n)]
        return [f.result(timeout=300) for f in futures]


@pytest.mark.parametrize("model_kind", ["llama", "t5"])
def test_threads_get_their_own_tasks(model_kind):
    model = build(model_kind)
    refs = references(model, JOBS, model_kind)
    hows = ["explicit", "context", "base"]

    def work(i):
        checked = 0
        for k in range(len(JOBS)):  # every thread its own order, so different jobs overlap
            job = JOBS[(i + k) % len(JOBS)]
            compare(run(model, job, model_kind, hows[(i + k) % 3]), refs[job], job)
            checked += 1
        return checked

    assert sum(in_threads(N_THREADS, work)) == N_THREADS * len(JOBS)
    assert model.routing.task_ids is None and model.routing.context_task_ids is None


@pytest.mark.parametrize(
    "config",
    [
        dict(router_granularity="block"),
        dict(router_granularity="model", n_splits=2),
        dict(n_splits=2),  # MHR, a router per layer
    ],
    ids=["block", "model-mhr", "mhr"],
)
def test_threads_with_shared_routers_and_mhr(config):
    model = build("llama", **config)
    jobs = [JOBS[0], JOBS[2], JOBS[3], JOBS[5], JOBS[7]]
    refs = references(model, jobs, "llama")

    def work(i):
        for k in range(2 * len(jobs)):
            job = jobs[(i + k) % len(jobs)]
            compare(run(model, job, "llama", "explicit" if (i + k) % 2 else "base"), refs[job], job)

    in_threads(N_THREADS, work)


def test_asyncio_tasks_get_their_own_tasks():
    """Coroutines enter their task contexts concurrently (each awaits while inside it, so all contexts are open
    at once), then call the model in the event loop, in a thread (``asyncio.to_thread`` carries the context)
    and in an executor (with ``copy_context().run``); an executor call without the context has no task ids."""
    model = build("llama")
    jobs = [job for job in JOBS if job.kind == "forward"] + [JOBS[5], JOBS[7]]
    refs = references(model, jobs, "llama")
    open_contexts = []

    async def worker(i, pool):
        loop = asyncio.get_running_loop()
        for k in range(len(jobs)):
            job = jobs[(i + k) % len(jobs)]
            with model.task_context(list(job.ids)):
                open_contexts.append(1)
                await asyncio.sleep(0)  # every other worker enters its own context now
                assert torch.equal(model.routing.context_task_ids, torch.tensor(job.ids))
                in_loop = run_without_ids(model, job)
                await asyncio.sleep(0)
                in_thread = await asyncio.to_thread(run_without_ids, model, job)
                in_pool = await loop.run_in_executor(pool, contextvars.copy_context().run, run_without_ids, model, job)
                with pytest.raises(ValueError, match="task_ids are required"):
                    await loop.run_in_executor(pool, run_without_ids, model, job)  # a worker thread's own context
                open_contexts.pop()
            for got in (in_loop, in_thread, in_pool):
                compare(got, refs[job], job)
        return i

    async def main():
        with ThreadPoolExecutor(3) as pool:
            return await asyncio.gather(*(worker(i, pool) for i in range(N_THREADS)))

    assert asyncio.run(main()) == list(range(N_THREADS))
    assert model.routing.context_task_ids is None


def run_without_ids(model, job: Job) -> torch.Tensor:
    """The job routed by whatever task context the caller is in (base model for forward, PolyModel for generate)."""
    inputs = job.inputs("llama")
    with torch.no_grad():
        if job.kind == "forward":
            return model.get_base_model()(**inputs).logits
        return _generated(model.generate(**inputs, **GENERATE, num_beams=job.beams))


def test_stress_changing_task_sets_and_the_eval_cache():
    """A few hundred calls from six threads, each with a random task set and batch; the eval cache stays a single
    immutable entry per adapter and, afterwards, still gives the sequential results."""
    model = build("llama", n_splits=2)
    adapters = [a for _, a in model.named_adapters()]
    # task sets that share their distinct tasks but not their row layout (a cache keyed on the task set alone
    # would serve one call the rows of another), single tasks, and other batch sizes
    id_sets = [(0, 1, 2, 3), (3, 2, 1, 0), (1, 0, 3, 2), (0, 2, 0, 2), (2, 2, 0, 0), (1,), (3, 3, 3, 3), (2, 0), (0, 2), (1, 3, 1)]
    pool = [Job("forward", len(ids) if len(ids) > 1 else 4, ids, seed=seed) for seed in range(3) for ids in id_sets]

    def fresh(job):  # computed with an empty cache
        for adapter in adapters:
            adapter.clear_cache()
        return run(model, job, "llama")

    refs = {job: fresh(job) for job in pool}
    calls_per_thread = 50

    def work(i):
        local = random.Random(100 + i)
        for _ in range(calls_per_thread):
            job = local.choice(pool)
            compare(run(model, job, "llama", local.choice(["explicit", "base"])), refs[job], job)
        return calls_per_thread

    assert sum(in_threads(N_THREADS, work)) == 300
    for adapter in adapters:
        entry = adapter._cache
        assert entry is None or (isinstance(entry, tuple) and len(entry) == 6)
    for job in pool:  # the cache left by the stress run serves later calls correctly
        compare(run(model, job, "llama"), refs[job], job)
    for adapter in adapters:
        adapter.clear_cache()
    for job in pool:
        compare(run(model, job, "llama"), refs[job], job)


def test_disable_adapter_in_one_thread_does_not_disable_another():
    model = build("llama")
    plain = tiny_llama(seed=3)  # the same base weights, never wrapped
    job = JOBS[2]
    inputs = job.inputs("llama")
    with torch.no_grad():
        base_ref = plain(**inputs).logits
    routed_ref = run(model, job, "llama")
    assert (routed_ref - base_ref).abs().max() > 1e-2
    rounds = 25

    def work(i):
        for _ in range(rounds):
            if i % 2:
                with model.disable_adapter(), torch.no_grad():
                    assert model.routing.disabled
                    torch.testing.assert_close(model(**inputs).logits, base_ref, **TOL)
            else:
                assert not model.routing.disabled
                compare(run(model, job, "llama", "explicit" if i % 4 else "base"), routed_ref, job)
        return model.routing.disabled

    assert in_threads(N_THREADS, work) == [False] * N_THREADS
    assert not model.routing.disabled

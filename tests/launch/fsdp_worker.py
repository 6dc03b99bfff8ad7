"""One training step of a tiny Llama with Poly/MHR adapters under FSDP2, run by ``tests/test_fsdp.py``.

``torchrun --nproc_per_node 2 tests/launch/fsdp_worker.py OUT`` (gloo, CPU): for every case of :data:`CASES`, every
rank builds the same model, shards it (:func:`polytropon.fsdp.fully_shard_routers`, ``fully_shard`` on each
decoder layer and on the root), runs an eval forward, one SGD step on its own batch with its own seed, an
eval forward again, and ``save_pretrained`` on every rank. Each rank writes what it saw to
``OUT/<case>/rank<r>.pt``; the test recomputes all of it in one process (:func:`reference_step`). Then, in the
same processes: the per-block case without ``fully_shard_routers``, the refusal to save an FSDP1 model, the
Trainer runs of ``fsdp_trainer_worker`` and the CLI run of ``fsdp_cli_worker`` (last: the CLI closes the
process group).

The helpers (model, data, seeds) are shared with the test, so both sides build exactly the same thing.
"""

from __future__ import annotations

import os
import sys

import torch

#: (router_granularity, n_splits): Poly and MHR with per-module, per-block and per-model routers
CASES = [("module", 1), ("module", 2), ("block", 1), ("block", 2), ("model", 1), ("model", 2)]
#: the ("block", 2) case without fully_shard_routers: every block's router is sharded with its block
BLOCK_ROUTERS_IN_BLOCKS = "block-s2-in-blocks"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB, WORLD = 64, 2
#: each rank's batch: task ids (repeats and mixed tasks), and the random seed of its routing samples
RANK_TASKS = [[0, 2, 2], [1, 0, 1]]
RANK_SEEDS = [101, 202]
EVAL_TASKS = [2, 1, 0, 1]
LR = 0.5


def case_name(granularity: str, n_splits: int) -> str:
    return f"{granularity}-s{n_splits}"


def build_base():
    """A tiny Llama (2 layers, width 32), the same on every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def build_model(granularity: str, n_splits: int):
    """:func:`build_base` with a training-mode adapter with random non-zero weights."""
    from polytropon import PolyConfig, get_peft_model

    base = build_base()
    config = PolyConfig(
        task_type="CAUSAL_LM", n_tasks=3, n_skills=3, n_splits=n_splits, r=4, init_weights=False,
        router_granularity=granularity, target_modules=TARGETS,
    )
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:  # B and the router logits too: nothing zero or uniform
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model.train()


def batch(rank: int) -> dict:
    gen = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(3, VOCAB, (len(RANK_TASKS[rank]), 6), generator=gen)
    return {"input_ids": ids, "labels": ids, "task_ids": list(RANK_TASKS[rank])}


def eval_batch() -> dict:
    gen = torch.Generator().manual_seed(999)
    return {"input_ids": torch.randint(3, VOCAB, (len(EVAL_TASKS), 5), generator=gen), "task_ids": list(EVAL_TASKS)}


def eval_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**eval_batch()).logits
    model.train()
    return out


def optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)


def reference_step(granularity: str, n_splits: int) -> dict:
    """The same step in one process: the ranks' losses, their averaged gradients, the updated adapter."""
    model = build_model(granularity, n_splits)
    before = eval_logits(model)
    losses = []
    for rank in range(WORLD):
        torch.manual_seed(RANK_SEEDS[rank])
        loss = model(**batch(rank)).loss
        (loss / WORLD).backward()
        losses.append(loss.item())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer(model).step()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"losses": losses, "grads": grads, "params": params, "eval_before": before, "eval_after": eval_logits(model),
            "model": model}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sharded_step(granularity: str, n_splits: int, out_dir: str, router_units: bool = True) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import polytropon.persistence as poly_model
    from polytropon.fsdp import fully_shard_routers

    rank = dist.get_rank()
    model = build_model(granularity, n_splits)
    if router_units:
        fully_shard_routers(model)
    for layer in model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = sorted(n for n, p in model.named_parameters() if p.requires_grad and type(p).__name__ == "DTensor")
    try:  # too late for the shared routers: refused
        fully_shard_routers(model)
        late = None
    except ValueError as err:
        late = str(err)

    before = eval_logits(model)
    torch.manual_seed(RANK_SEEDS[rank])
    loss = model(**batch(rank)).loss
    loss.backward()
    grads = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer(model).step()
    params = {n: _full(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}
    after = eval_logits(model)

    # save_pretrained on every rank: count the files each rank writes
    writes = []
    original = poly_model.save_tensors
    poly_model.save_tensors = lambda path, tensors: (writes.append(path), original(path, tensors))[1]
    try:
        adapter_dir = os.path.join(out_dir, "adapter")
        model.save_pretrained(adapter_dir)
        present_on_return = sorted(os.listdir(adapter_dir))
    finally:
        poly_model.save_tensors = original
    torch.save(
        {"loss": loss.item(), "grads": grads, "params": params, "eval_before": before, "eval_after": after,
         "sharded": sharded, "late": late, "writes": writes, "present_on_return": present_on_return},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def fsdp1_refusal(out_dir: str) -> None:
    """``save_pretrained`` of a model holding a ``FullyShardedDataParallel`` (FSDP1) unit: the error message."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = build_model("module", 1)
    layers = model.model.model.layers
    layers[0] = FullyShardedDataParallel(layers[0], use_orig_params=True, device_id=torch.device("cpu"))
    try:
        model.save_pretrained(os.path.join(out_dir, "fsdp1"))
        message = None
    except ValueError as err:
        message = str(err)
    with open(os.path.join(out_dir, f"fsdp1_rank{dist.get_rank()}.txt"), "w") as fh:
        fh.write(repr(message))


def accelerate_has_fsdp2() -> bool:
    """Whether the installed accelerate can prepare a model with FSDP2 (``fsdp_version=2``)."""
    import inspect

    try:
        from accelerate.utils import FullyShardedDataParallelPlugin
    except ImportError:
        return False
    return "fsdp_version" in inspect.signature(FullyShardedDataParallelPlugin).parameters


def main(out: str) -> None:
    import time

    import torch.distributed as dist

    from tests.launch import fsdp_cli_worker, fsdp_trainer_worker

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    seconds = {}
    try:
        for granularity, n_splits in CASES:
            started = time.perf_counter()
            case_dir = os.path.join(out, case_name(granularity, n_splits))
            os.makedirs(case_dir, exist_ok=True)
            sharded_step(granularity, n_splits, case_dir)
            seconds[case_name(granularity, n_splits)] = time.perf_counter() - started
        # per-block routers left to their blocks' units (the blocks are the sharded units)
        case_dir = os.path.join(out, BLOCK_ROUTERS_IN_BLOCKS)
        os.makedirs(case_dir, exist_ok=True)
        sharded_step("block", 2, case_dir, router_units=False)
        fsdp1_refusal(out)
        rank = dist.get_rank()
        if accelerate_has_fsdp2():
            # the HF Trainer with accelerate's FSDP2 preparation, in the same processes (one launch for all tests)
            started = time.perf_counter()
            fsdp_trainer_worker.run(os.path.join(out, "trainer"))
            seconds["trainer"] = time.perf_counter() - started
            # last: polytropon train (the CLI closes the process group when it returns)
            started = time.perf_counter()
            fsdp_cli_worker.run(os.path.join(out, "cli"))
            seconds["cli"] = time.perf_counter() - started
        if rank == 0:
            print("seconds:", {k: round(v, 2) for k, v in seconds.items()})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from polytropon.app.cli import end_worker_process

    main(sys.argv[1])
    end_worker_process(0)  # as `polytropon` does in a launched rank: no interpreter teardown beside gloo's threads

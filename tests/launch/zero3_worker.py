"""DeepSpeed ZeRO-3 on two CPU processes (gloo), run by ``tests/test_zero3.py``.

``DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/launch/zero3_worker.py OUT``: for Poly and MHR, every rank builds
the same tiny Llama with a random non-zero adapter (:func:`fsdp_worker.build_model`), hands it to
``deepspeed.initialize`` with ZeRO-3 (``stage3_param_persistence_threshold: 0``, so every adapter tensor is
partitioned) and DeepSpeed's torch AdamW, then:

* ``save_pretrained`` on every rank before training (``OUT/<case>/initial``): the test compares it with the
  unsharded model's adapter;
* one training step on each rank's own batch, ``save_pretrained`` again (``OUT/<case>/trained``), and DeepSpeed's
  own consolidation of the partitions (``_zero3_consolidated_16bit_state_dict``, rank 0: ``consolidated.pt``);
* the trained adapter loaded into the engine's model (``load_adapter``) and into a base model partitioned by
  ``deepspeed.zero.Init(module=...)`` (before any adapter exists, ``from_pretrained``, then ``deepspeed.initialize``): eval
  logits of both, per rank (``rank<r>.pt``);
* the HF Trainer with a ZeRO-3 ``deepspeed`` config (:func:`run_trainer`, ``OUT/trainer``), and ``PolyTrainer``
  with checkpoints and a resumed run (:func:`run_poly_trainer`, ``OUT/poly_trainer``).
"""

from __future__ import annotations

import os
import sys

import torch

from tests.launch import fsdp_worker as worker

#: (case name, n_splits): Poly and MHR, one router per layer
CASES = [("poly", 1), ("mhr", 2)]
GRANULARITY = "module"


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True, "weight_decay": 0.0}},
    }


def adapter_params(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def eval_logits(module) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(**worker.eval_batch()).logits.detach().clone()


def run_case(name: str, n_splits: int, out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    from polytropon import PolyModel

    rank = dist.get_rank()
    model = worker.build_model(GRANULARITY, n_splits)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=adapter_params(model), config=ds_config())
    params = adapter_params(model)
    partitioned = [n for n, p in model.named_parameters() if p.requires_grad and p.ds_tensor.numel() < p.ds_numel]
    model.save_pretrained(os.path.join(out, "initial"))  # every rank; rank 0 writes
    initial_files = sorted(os.listdir(os.path.join(out, "initial")))

    engine.train()
    torch.manual_seed(worker.RANK_SEEDS[rank])
    loss = engine(**worker.batch(rank)).loss
    engine.backward(loss)
    engine.step()
    model.save_pretrained(os.path.join(out, "trained"))
    consolidated = engine._zero3_consolidated_16bit_state_dict()  # collective; the full state dict on rank 0
    if rank == 0:
        torch.save({k: v for k, v in consolidated.items() if "adapters" in k}, os.path.join(out, "consolidated.pt"))

    # loading into the ZeRO-3 model: a second adapter, routed by the same engine
    trained = eval_logits(engine)
    model.load_adapter(os.path.join(out, "trained"), "loaded")
    model.set_adapter("loaded")
    loaded = eval_logits(engine)

    # loading onto a base partitioned from the start (deepspeed.zero.Init), then the engine
    base = worker.build_base()
    deepspeed.zero.Init(module=base, config_dict_or_path=ds_config())  # partitions the existing module in place
    zero_init_base = all(hasattr(p, "ds_id") for p in base.parameters())
    fresh = PolyModel.from_pretrained(base, os.path.join(out, "trained"), is_trainable=True)
    fresh_engine, _, _, _ = deepspeed.initialize(model=fresh, model_parameters=adapter_params(fresh), config=ds_config())
    from_zero_init = eval_logits(fresh_engine)
    torch.save({"partitioned": partitioned, "n_params": len(params), "initial_files": initial_files,
                "trained_logits": trained, "loaded_logits": loaded, "zero_init_base": zero_init_base,
                "zero_init_logits": from_zero_init}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()


def trainer_ds_config() -> dict:
    """ZeRO-3 for the HF Trainer: batch sizes, learning rate and AdamW settings from ``TrainingArguments``."""
    return {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto",
                                                  "torch_adam": True}},
    }


def run_trainer(out: str) -> None:
    """The HF Trainer with ``deepspeed=<ZeRO-3 config>`` (accelerate's DeepSpeed integration), then two saves.

    ``save_pretrained`` on every rank (the adapter gathered by polytropon), and ``save_pretrained(state_dict=...,
    is_main_process=True)`` on rank 0 alone with DeepSpeed's consolidated trainable tensors, as the Trainer saves a
    PEFT model under ZeRO-3 (no collective call inside).
    """
    import torch.distributed as dist
    from transformers import Trainer, TrainingArguments

    from tests.launch import fsdp_trainer_worker as trainer_worker

    rank = dist.get_rank()
    model = worker.build_model(GRANULARITY, 2)
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", use_cpu=True, ddp_backend="gloo", remove_unused_columns=False,
        report_to=[], disable_tqdm=True, seed=42, deepspeed=trainer_ds_config(),
    )
    trainer = Trainer(model=model, args=args, train_dataset=trainer_worker.Rows(), data_collator=trainer_worker.collate)
    trainer.train()
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in adapter_params(model))
    model.save_pretrained(os.path.join(out, "gathered"))
    state = trainer.deepspeed._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)  # collective
    if rank == 0:  # DeepSpeed returns the state dict on rank 0 only; the Trainer's other ranks do not call save
        model.save_pretrained(os.path.join(out, "from_state_dict"), state_dict=state, is_main_process=True)
    dist.barrier()
    torch.save({"world_size": args.world_size, "distributed_type": str(trainer.accelerator.distributed_type),
                "partitioned": partitioned,
                "eval_logits": eval_logits(trainer.model_wrapped)}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()


def run_poly_trainer(out: str) -> None:
    """``PolyTrainer`` under ZeRO-3: 3 steps with a checkpoint after step 2, then a run resumed from it."""
    import torch.distributed as dist
    from transformers import TrainingArguments

    from tests.launch import fsdp_trainer_worker as trainer_worker
    from polytropon.app.training import PolyTrainer, trainable_state
    from polytropon.fsdp import is_sharded

    def train(sub: str, resume: str | None = None):
        model = worker.build_model(GRANULARITY, 2)
        args = TrainingArguments(
            output_dir=os.path.join(out, sub), max_steps=3, save_strategy="steps", save_steps=2,
            per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1, use_cpu=True, ddp_backend="gloo",
            remove_unused_columns=False, report_to=[], disable_tqdm=True, seed=42, deepspeed=trainer_ds_config(),
        )
        trainer = PolyTrainer(model=model, args=args, train_dataset=trainer_worker.Rows(),
                              data_collator=trainer_worker.collate, router_lr=0.3)
        trainer.train(resume_from_checkpoint=resume)
        return model, trainable_state(model)  # trainable_state: a collective call under ZeRO-3

    model, state = train("run")
    sharded = is_sharded(model)
    checkpoint = os.path.join(out, "run", "checkpoint-2")
    _, resumed = train("resumed", resume=checkpoint)
    torch.save({"sharded": sharded, "state": state, "resumed": resumed, "files": sorted(os.listdir(checkpoint))},
               os.path.join(out, f"rank{dist.get_rank()}.pt"))
    dist.barrier()


def main(out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        for name, n_splits in CASES:
            case_dir = os.path.join(out, name)
            os.makedirs(case_dir, exist_ok=True)
            run_case(name, n_splits, case_dir)
        os.makedirs(os.path.join(out, "trainer"), exist_ok=True)
        run_trainer(os.path.join(out, "trainer"))
        os.makedirs(os.path.join(out, "poly_trainer"), exist_ok=True)
        run_poly_trainer(os.path.join(out, "poly_trainer"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from polytropon.app.cli import end_worker_process

    main(sys.argv[1])
    end_worker_process(0)  # as `polytropon` does in a launched rank: no interpreter teardown beside gloo's threads

"""The HF Trainer (``PolyTrainer``) with accelerate's FSDP2 preparation on CPU, beside the same run under DDP.

Run by ``fsdp_worker.py`` (:func:`run`) in its ``torchrun`` processes: each rank trains the same tiny Llama with a
per-model MHR router twice, for :data:`STEPS` steps on the same data: once as the Trainer runs on CPU (DDP),
once with the model sharded by accelerate's FSDP2 code (``fsdp2_prepare_model``: ``fully_shard`` on every
decoder layer, the embeddings, the tail and the root) after :func:`polytropon.fsdp.fully_shard_routers`, and
once more sharded, resumed from the checkpoint of step 2 of the second run.

accelerate (1.15) never turns FSDP on for CPU processes: its state keeps ``MULTI_CPU`` (DDP) whatever the
FSDP configuration says. :class:`ForcedFSDPTrainer` sets the FSDP state after the Trainer made its
accelerator, so that the Trainer and accelerate take their FSDP2 paths (model preparation, optimizer
mapping, checkpoint saving) as they do on GPUs.
"""

from __future__ import annotations

import os

import torch

from tests.launch import fsdp_worker as worker

STEPS, SAVE_STEPS, BATCH, SEED = 3, 2, 2, 42  # checkpoints after steps 2 and 3
GRANULARITY, N_SPLITS = "model", 2


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 12):
        gen = torch.Generator().manual_seed(5)
        self.rows = [{"input_ids": torch.randint(3, worker.VOCAB, (6,), generator=gen), "task_ids": i % 3} for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def collate(rows: list[dict]) -> dict:
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids, "task_ids": torch.tensor([r["task_ids"] for r in rows])}


def arguments(out: str, fsdp: bool):
    from transformers import TrainingArguments

    extra = {}
    if fsdp:
        extra = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                             "cpu_ram_efficient_loading": False, "state_dict_type": "FULL_STATE_DICT"})
    return TrainingArguments(
        output_dir=out, max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-2, logging_steps=1,
        save_strategy="steps" if fsdp else "no", save_steps=SAVE_STEPS, max_grad_norm=0.0, seed=SEED, use_cpu=True,
        ddp_backend="gloo", remove_unused_columns=False, label_names=["labels"], report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, **extra,
    )


def trainer_class():
    from polytropon.app.training import PolyTrainer

    class ForcedFSDPTrainer(PolyTrainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if self.args.fsdp_plugin_args is None:
                return
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    return ForcedFSDPTrainer


def train(out: str, fsdp: bool, resume: str | None = None) -> tuple[dict, list, object]:
    from polytropon.fsdp import fully_shard_routers
    from polytropon.app.training import trainable_state

    model = worker.build_model(GRANULARITY, N_SPLITS)
    if fsdp:
        fully_shard_routers(model)
    from transformers import TrainerCallback

    class CountSteps(TrainerCallback):
        def __init__(self):
            self.steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    counter = CountSteps()
    trainer = trainer_class()(model=model, args=arguments(out, fsdp), train_dataset=Rows(), data_collator=collate,
                              router_lr=0.3, callbacks=[counter])
    trainer.train(resume_from_checkpoint=resume)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]  # on resume: with the checkpoint's
    return trainable_state(model), losses + [counter.steps], model


def run(out: str) -> None:
    """Both trainings on every rank (the process group is open); writes ``out/rank<r>.pt``."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    ddp_state, ddp_losses, _ = train(os.path.join(out, "ddp"), fsdp=False)
    fsdp_state, fsdp_losses, model = train(os.path.join(out, "fsdp"), fsdp=True)
    sharded = sorted(n for n, p in model.named_parameters() if p.requires_grad and isinstance(p, DTensor))
    model.save_pretrained(os.path.join(out, "adapter"))  # every rank; rank 0 writes
    # a sharded run resumed from the checkpoint of step 2 ends where the uninterrupted one did
    resumed, resumed_losses, _ = train(os.path.join(out, "resumed"), fsdp=True, resume=os.path.join(out, "fsdp", f"checkpoint-{SAVE_STEPS}"))
    torch.save({"ddp": ddp_state, "fsdp": fsdp_state, "resumed": resumed, "resumed_losses": resumed_losses, "ddp_losses": ddp_losses,
                "fsdp_losses": fsdp_losses, "sharded": sharded}, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    dist.barrier()

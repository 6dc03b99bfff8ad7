"""``polytropon train`` with the Trainer's model sharded by accelerate's FSDP2 code, on two CPU processes.

Run by ``fsdp_worker.py`` (:func:`run`) last in its ``torchrun`` processes (the CLI closes the process group
when it returns). As in ``fsdp_trainer_worker``, the FSDP state is set on the accelerator the Trainer makes,
because accelerate never shards CPU processes by itself; the plugin wraps every ``BertLayer``.
"""

from __future__ import annotations

import json
import os


def run(out: str) -> int:
    import torch.distributed as dist

    from tests import helpers
    from polytropon.app import cli, training
    from polytropon.app.commands import train as train_verb

    inputs = os.path.join(out, "inputs")
    if dist.get_rank() == 0:
        helpers.make_tiny_bert(os.path.join(inputs, "bert"))
        helpers.write_jsonl(os.path.join(inputs, "train.jsonl"), helpers.make_rows(24, seed=1))
        helpers.write_jsonl(os.path.join(inputs, "eval.jsonl"), helpers.make_rows(8, seed=2))
    dist.barrier()

    original = training.PolyTrainer.create_accelerator_and_postprocess

    def forced(self):
        original(self)
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        self.accelerator.state.distributed_type = DistributedType.FSDP
        self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, transformer_cls_names_to_wrap=["BertLayer"], cpu_ram_efficient_loading=False,
            state_dict_type="FULL_STATE_DICT",
        )
        self.is_fsdp_enabled = True

    seen = []
    is_sharded = train_verb.is_sharded

    def recording(model):
        seen.append(is_sharded(model))
        return seen[-1]

    training.PolyTrainer.create_accelerator_and_postprocess = forced
    train_verb.is_sharded = recording
    os.environ["POLYTROPON_RANK_DUMP_DIR"] = os.path.join(out, "ranks")
    rank = dist.get_rank()
    try:
        code = cli.main([
            "train", "--model", os.path.join(inputs, "bert"), "--data", os.path.join(inputs, "train.jsonl"),
            "--eval-data", os.path.join(inputs, "eval.jsonl"), "--output-dir", os.path.join(out, "run"),
            "--max-steps", "6", "--batch-size", "4", "--n-skills", "2", "--save-steps", "3", "--logging-steps", "1",
            "--no-baseline", "--quiet",
        ])
    finally:
        training.PolyTrainer.create_accelerator_and_postprocess = original
        train_verb.is_sharded = is_sharded
    with open(os.path.join(out, f"cli_rank{rank}.json"), "w") as fh:
        json.dump({"code": code, "is_sharded": seen}, fh)
    return code

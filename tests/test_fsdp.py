"""FSDP2 (``fully_shard``) on two CPU processes (gloo): a sharded training step equals the single-process step,
and ``save_pretrained`` of the sharded model writes the complete adapter once, loadable by polytropon and PEFT.

One ``torchrun`` launch (``launch/fsdp_worker.py``) runs every case of ``fsdp_worker.CASES`` (Poly and MHR;
per-module, per-block and per-model routers), then PolyTrainer and ``polytropon train`` with accelerate's FSDP2
preparation (``launch/fsdp_trainer_worker.py``, ``launch/fsdp_cli_worker.py``); the tests recompute what they can in this
process and compare.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.launch import fsdp_worker as worker

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)
needs_accelerate_fsdp2 = pytest.mark.skipif(not worker.accelerate_has_fsdp2(), reason="accelerate without FSDP2")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SRC = os.path.join(ROOT, "src")
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "launch", "fsdp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


_REFERENCES: dict = {}


def _reference(granularity, n_splits):
    key = (granularity, n_splits)
    if key not in _REFERENCES:
        _REFERENCES[key] = worker.reference_step(granularity, n_splits)
    return _REFERENCES[key]


def _ranks(out, granularity, n_splits):
    folder = out / worker.case_name(granularity, n_splits)
    return [torch.load(folder / f"rank{r}.pt") for r in range(worker.WORLD)], folder / "adapter"


@pytest.mark.parametrize("granularity,n_splits", worker.CASES)
def test_sharded_step_equals_single_process_step(sharded_runs, granularity, n_splits):
    ranks, _ = _ranks(sharded_runs, granularity, n_splits)
    _check_step(ranks, _reference(granularity, n_splits), granularity)


def test_block_routers_sharded_with_their_blocks(sharded_runs):
    """Without fully_shard_routers, per-block routers belong to their block's unit: the same step."""
    folder = sharded_runs / worker.BLOCK_ROUTERS_IN_BLOCKS
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(worker.WORLD)]
    _check_step(ranks, _reference("block", 2), "block")


def _check_step(ranks, ref, granularity):
    # every trainable tensor was really sharded (a DTensor) on both ranks
    trainable = sorted(ref["grads"])
    assert [r["sharded"] for r in ranks] == [trainable, trainable]
    for rank, got in enumerate(ranks):
        # each rank's loss is the loss of its own batch under its own routing samples
        assert got["loss"] == pytest.approx(ref["losses"][rank], rel=1e-6, abs=1e-6)
        torch.testing.assert_close(got["eval_before"], ref["eval_before"], **TOL)
        torch.testing.assert_close(got["eval_after"], ref["eval_after"], **TOL)
        for name in trainable:
            # the gradient is the mean over the ranks' batches; the step moved every tensor
            torch.testing.assert_close(got["grads"][name], ref["grads"][name], **TOL)
            torch.testing.assert_close(got["params"][name], ref["params"][name], **TOL)
    assert all(ref["grads"][n].abs().max() > 1e-6 for n in trainable)  # every tensor gets a real gradient
    assert not torch.allclose(ref["eval_before"], ref["eval_after"], atol=1e-3)  # the step changed the outputs
    if granularity != "module":  # fully_shard_routers after the blocks were sharded is refused, with the reason
        assert "must run before fully_shard" in ranks[0]["late"]


@pytest.mark.parametrize("granularity,n_splits", worker.CASES)
def test_sharded_save_writes_the_complete_adapter_once(sharded_runs, granularity, n_splits):
    from polytropon import PolyModel

    ranks, adapter = _ranks(sharded_runs, granularity, n_splits)
    assert len(ranks[0]["writes"]) == 1 and ranks[1]["writes"] == []  # rank 0 writes, rank 1 does not
    # every rank returns from save_pretrained with the files in place
    assert ranks[1]["present_on_return"] == ["adapter_config.json", "adapter_model.safetensors"]

    ref = _reference(granularity, n_splits)
    loaded = PolyModel.from_pretrained(worker.build_base(), str(adapter))
    assert loaded.peft_config["default"].router_granularity == granularity
    expected = ref["model"].adapter_state_dict()
    got = loaded.adapter_state_dict()
    assert sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**worker.eval_batch()).logits, ref["eval_after"], **TOL)


@pytest.mark.parametrize("granularity,n_splits", [("module", 2), ("model", 1)])
def test_sharded_save_loads_in_peft(sharded_runs, granularity, n_splits):
    import peft

    _, adapter = _ranks(sharded_runs, granularity, n_splits)
    ref = _reference(granularity, n_splits)
    theirs = peft.PeftModel.from_pretrained(worker.build_base(), str(adapter)).eval()
    batch = worker.eval_batch()
    with torch.no_grad():
        got = theirs(input_ids=batch["input_ids"], task_ids=torch.tensor(batch["task_ids"])).logits
    torch.testing.assert_close(got, ref["eval_after"], **TOL)


def test_fsdp1_is_refused_by_name(sharded_runs):
    for rank in range(worker.WORLD):
        message = (sharded_runs / f"fsdp1_rank{rank}.txt").read_text()
        assert "FullyShardedDataParallel (FSDP1) cannot be saved by polytropon" in message
    assert not (sharded_runs / "fsdp1").exists()


def test_single_process_keeps_the_batched_sampling():
    """Without sharding, a training call still draws every router's route at once before the model runs."""
    model = worker.build_model("module", 2)
    ids = torch.tensor(worker.RANK_TASKS[0])
    samples = model._presample(ids)
    routers = model._active_routers()
    assert samples is not None and set(samples) == {id(r) for r in routers} and len(routers) == 14


@needs_accelerate_fsdp2
def test_trainer_with_accelerate_fsdp2_equals_the_ddp_run(sharded_runs):
    """PolyTrainer prepared by accelerate's FSDP2 code trains exactly as under DDP, and checkpoints in full."""
    from safetensors.torch import load_file

    from tests.launch import fsdp_trainer_worker as trainer_worker
    from polytropon import PolyModel

    folder = sharded_runs / "trainer"
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(worker.WORLD)]
    names = sorted(ranks[0]["ddp"])
    assert len(names) == 29  # 28 skill tensors and the one per-model router
    for got in ranks:
        assert got["sharded"] == names  # accelerate sharded every trainable tensor
        # logged losses, then the number of steps the run made
        assert len(got["fsdp_losses"]) == trainer_worker.STEPS + 1 and got["fsdp_losses"][-1] == trainer_worker.STEPS
        assert got["fsdp_losses"] == pytest.approx(got["ddp_losses"], rel=1e-6)
        # resumed: the checkpoint's log and one more step, with the loss of the uninterrupted run's last step
        assert got["resumed_losses"][-1] == trainer_worker.STEPS - trainer_worker.SAVE_STEPS
        assert got["resumed_losses"] == pytest.approx(got["fsdp_losses"][:-1] + [1], rel=1e-6)
        for name in names:
            torch.testing.assert_close(got["fsdp"][name], got["ddp"][name], **TOL)
            torch.testing.assert_close(got["fsdp"][name], ranks[0]["fsdp"][name], rtol=0, atol=0)  # gathered alike
            torch.testing.assert_close(got["resumed"][name], got["fsdp"][name], **TOL)  # resumed under FSDP
    start = worker.build_model(trainer_worker.GRANULARITY, trainer_worker.N_SPLITS)
    initial = dict(start.named_parameters())
    assert all(not torch.allclose(initial[n].detach(), ranks[0]["fsdp"][n], atol=1e-4) for n in names)  # all trained

    # the Trainer's checkpoint (saved under FSDP on every rank) holds the full adapter and trainable state
    checkpoint = folder / "fsdp" / f"checkpoint-{trainer_worker.STEPS}"
    state = load_file(str(checkpoint / "model.safetensors"))
    assert sorted(state) == names
    for name in names:
        torch.testing.assert_close(state[name], ranks[0]["fsdp"][name], rtol=0, atol=0)
    for adapter in (checkpoint, folder / "adapter"):
        loaded = PolyModel.from_pretrained(worker.build_base(), str(adapter), is_trainable=True)
        params = dict(loaded.named_parameters())
        for name in names:
            torch.testing.assert_close(params[name].detach(), ranks[0]["fsdp"][name], rtol=0, atol=0)


def test_save_refuses_partitioned_tensors_and_writes_nothing(tmp_path):
    """A parameter held only in part (DeepSpeed ZeRO-3 leaves an empty tensor and ``ds_shape``) is refused."""
    model = worker.build_model("module", 1)
    param = model.model.model.layers[1].mlp.down_proj.adapters["default"].poly_lora_B
    full_shape = tuple(param.shape)
    param.data = torch.empty(0)
    param.ds_shape = torch.Size(full_shape)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj\.poly_lora_B: this process holds only a partition .*"
                       r"full shape \(1, 3, 4, 32\)"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@needs_accelerate_fsdp2
def test_cli_train_with_a_sharded_model(sharded_runs):
    """``polytropon train`` whose Trainer shards the model (accelerate's FSDP2): every rank saves, rank 0 evaluates."""
    import json

    from transformers import AutoModelForSequenceClassification

    from polytropon import PolyModel
    from polytropon.app.training import state_digest, trainable_state

    folder = sharded_runs / "cli"
    for rank in range(worker.WORLD):
        seen = json.loads((folder / f"cli_rank{rank}.json").read_text())
        assert seen["code"] == 0 and seen["is_sharded"][-1] is True  # the trained model was sharded on every rank
    dumps = [json.loads((folder / "ranks" / f"rank{r}.json").read_text()) for r in range(worker.WORLD)]
    assert dumps[0]["digest"] == dumps[1]["digest"]  # the gathered adapters agree
    base = AutoModelForSequenceClassification.from_pretrained(str(folder / "inputs" / "bert"), num_labels=2)
    saved = PolyModel.from_pretrained(base, str(folder / "run" / "adapter"), is_trainable=True)
    assert state_digest(trainable_state(saved)) == dumps[0]["digest"]  # rank 0 saved what the ranks trained
    assert all(p.abs().max() > 0 for n, p in saved.named_parameters() if "poly_lora_B" in n)  # trained from B = 0
    metrics = json.loads((folder / "run" / "metrics.json").read_text())
    assert metrics["train"]["world_size"] == 2 and metrics["train"]["global_steps"] == 6
    assert set(metrics["poly"]["per_task"]) == {"animal", "color"}
    assert (sharded_runs / "stdout.txt").read_text().count("Per-task accuracy") == 1

"""DeepSpeed ZeRO-3 on two CPU processes (gloo): ``save_pretrained`` gathers the partitioned adapter, rank 0 writes
it complete, every rank returns with the files in place; the files load in polytropon and in PEFT; loading an
adapter into a ZeRO-3 model (and onto a base partitioned before the adapter existed) computes what one process
computes.

One ``torchrun`` launch of ``launch/zero3_worker.py`` (``DS_ACCELERATOR=cpu``) runs Poly and MHR; the tests recompute in
this process what they can and compare.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")

from tests.launch import fsdp_worker  # noqa: E402
from tests.launch import zero3_worker as worker  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SRC = os.path.join(ROOT, "src")
TOL = dict(rtol=1e-5, atol=1e-5)
CASES = [name for name, _ in worker.CASES]
SPLITS = dict(worker.CASES)


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "launch", "zero3_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _ranks(out, case):
    return [torch.load(out / case / f"rank{r}.pt") for r in range(fsdp_worker.WORLD)]


def _saved(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("case", CASES)
def test_every_adapter_tensor_was_partitioned(zero3_runs, case):
    for rank in _ranks(zero3_runs, case):
        assert rank["n_params"] > 0 and len(rank["partitioned"]) == rank["n_params"]
        # save_pretrained returned on every rank with the files written
        assert rank["initial_files"] == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("case", CASES)
def test_save_equals_the_unsharded_adapter(zero3_runs, case):
    expected = fsdp_worker.build_model(worker.GRANULARITY, SPLITS[case]).adapter_state_dict()
    got = _saved(zero3_runs / case / "initial")
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].shape == tensor.shape
        torch.testing.assert_close(got[key], tensor.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_trained_save_equals_deepspeeds_own_consolidation(zero3_runs, case):
    """After a ZeRO-3 step the saved tensors are DeepSpeed's consolidated parameters (and differ from the start)."""
    consolidated = torch.load(zero3_runs / case / "consolidated.pt")
    got = _saved(zero3_runs / case / "trained")
    initial = _saved(zero3_runs / case / "initial")
    mapped = {"base_model." + k.replace(".adapters.default.", "."): v for k, v in consolidated.items()}
    assert sorted(mapped) == sorted(got)
    for key, tensor in mapped.items():
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=0)
    assert all(not torch.equal(got[k], initial[k]) for k in got)  # every tensor was trained


@pytest.mark.parametrize("case", CASES)
def test_trained_save_loads_in_polytropon_and_peft(zero3_runs, case):
    import peft

    from polytropon import PolyModel

    folder = str(zero3_runs / case / "trained")
    expected = _ranks(zero3_runs, case)[0]["trained_logits"]  # the ZeRO-3 engine's eval logits after the step
    batch = fsdp_worker.eval_batch()
    ours = PolyModel.from_pretrained(fsdp_worker.build_base(), folder)
    theirs = peft.PeftModel.from_pretrained(fsdp_worker.build_base(), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, expected, **TOL)
        got = theirs(input_ids=batch["input_ids"], task_ids=torch.tensor(batch["task_ids"])).logits
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("case", CASES)
def test_loading_into_a_zero3_model(zero3_runs, case):
    """load_adapter into the engine's model, and from_pretrained onto a base partitioned by deepspeed.zero.Init."""
    for rank in _ranks(zero3_runs, case):
        assert rank["zero_init_base"]  # every base parameter was partitioned before the adapter was loaded
        torch.testing.assert_close(rank["loaded_logits"], rank["trained_logits"], **TOL)
        torch.testing.assert_close(rank["zero_init_logits"], rank["trained_logits"], **TOL)


def test_trainer_with_a_zero3_deepspeed_config(zero3_runs):
    """The HF Trainer (deepspeed=<ZeRO-3 config>) trains the PolyModel on 2 CPU processes; both ways of saving give
    the same complete adapter: save_pretrained on every rank (gathered by polytropon), and save_pretrained on rank 0
    with DeepSpeed's consolidated state dict (as the Trainer saves PEFT models under ZeRO-3)."""
    import peft

    from polytropon import PolyModel

    out = zero3_runs / "trainer"
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(fsdp_worker.WORLD)]
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["distributed_type"] == "DistributedType.DEEPSPEED"
        assert rank["partitioned"]  # every adapter tensor was a ZeRO-3 partition after training
    gathered, from_state = _saved(out / "gathered"), _saved(out / "from_state_dict")
    initial = fsdp_worker.build_model(worker.GRANULARITY, 2).adapter_state_dict()
    assert sorted(gathered) == sorted(from_state) == sorted(initial)
    for key in gathered:
        torch.testing.assert_close(gathered[key], from_state[key], rtol=0, atol=0)
        assert not torch.equal(gathered[key], initial[key].detach())  # trained
    batch = fsdp_worker.eval_batch()
    for folder in ("gathered", "from_state_dict"):
        ours = PolyModel.from_pretrained(fsdp_worker.build_base(), str(out / folder))
        theirs = peft.PeftModel.from_pretrained(fsdp_worker.build_base(), str(out / folder)).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(**batch).logits, ranks[0]["eval_logits"], **TOL)
            got = theirs(input_ids=batch["input_ids"], task_ids=torch.tensor(batch["task_ids"])).logits
        torch.testing.assert_close(got, ranks[0]["eval_logits"], **TOL)


def test_save_pretrained_with_a_state_dict_missing_the_adapter_is_refused(tmp_path):
    model = fsdp_worker.build_model(worker.GRANULARITY, 1)
    state = {k: v for k, v in model.state_dict().items() if "q_proj.adapters" not in k}
    with pytest.raises(ValueError, match="the state_dict given to save_pretrained has no tensor for "
                                         "base_model.model.model.layers.0.self_attn.q_proj.poly_lora_A"):
        model.save_pretrained(tmp_path / "out", state_dict=state)
    assert not (tmp_path / "out").exists()
    model.save_pretrained(tmp_path / "ok", state_dict=model.state_dict())  # the whole model's: the adapter's tensors
    expected = model.adapter_state_dict()
    got = _saved(tmp_path / "ok")
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k].detach()) for k in got)
    model.save_pretrained(tmp_path / "not-main", state_dict={}, is_main_process=False)
    assert not (tmp_path / "not-main").exists()


def test_poly_trainer_checkpoints_and_resumes_under_zero3(zero3_runs):
    """PolyTrainer's checkpoints under ZeRO-3 hold the complete adapter and trainable state (every rank takes part
    in the gathering: is_sharded is true); a run resumed from step 2 ends where the uninterrupted one did."""
    from safetensors.torch import load_file

    out = zero3_runs / "poly_trainer"
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(fsdp_worker.WORLD)]
    checkpoint = out / "run" / "checkpoint-2"
    for rank in ranks:
        assert rank["sharded"]
        # adapter-only: PEFT's two files and model.safetensors, the trainable tensors (checked below)
        assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= set(rank["files"])
        assert "pytorch_model.bin" not in rank["files"]
        assert rank["state"] and all(t.numel() > 0 for t in rank["state"].values())
        for name, tensor in rank["state"].items():
            torch.testing.assert_close(rank["resumed"][name], tensor, rtol=0, atol=0)
    at_step_2 = load_file(str(checkpoint / "model.safetensors"))
    initial = {n: p.detach() for n, p in fsdp_worker.build_model(worker.GRANULARITY, 2).named_parameters() if p.requires_grad}
    assert sorted(at_step_2) == sorted(initial) == sorted(ranks[0]["state"])
    assert all(not torch.equal(at_step_2[n], initial[n]) and not torch.equal(at_step_2[n], ranks[0]["state"][n]) for n in initial)
    adapter = _saved(checkpoint)
    assert len(adapter) == len(initial) and all(t.numel() > 0 for t in adapter.values())

"""Checkpoints are PEFT's own files: ours load in PEFT and PEFT's load in ours, with equal outputs."""

import pytest
import torch
from tests.helpers import MODELS

import peft
from polytropon import PolyConfig, PolyModel, get_peft_model

TASK_TYPES = {"llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}
TASKS = [2, 0, 1, 2]


def randomize_heads_(model, saved_attr):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name and saved_attr in name:
                p.normal_()


@pytest.mark.parametrize("n_splits", [1, 4])
@pytest.mark.parametrize("kind", ["llama", "t5", "bert"])
def test_our_checkpoint_loads_in_peft(tmp_dir, kind, n_splits, batch_inputs, output_tensor, randomize_):
    ours = get_peft_model(MODELS[kind](), PolyConfig(n_tasks=3, n_skills=3, n_splits=n_splits, init_weights=False))
    randomize_(ours)
    randomize_heads_(ours, "classifier")
    ours.eval().save_pretrained(tmp_dir)
    theirs = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_dir).eval()
    inputs = batch_inputs(kind)
    with torch.no_grad():
        expected = output_tensor(ours(**inputs, task_ids=torch.tensor(TASKS)))
        got = output_tensor(theirs(**inputs, task_ids=torch.tensor(TASKS)))
        base = output_tensor(MODELS[kind]()(**inputs))
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_splits", [1, 4])
@pytest.mark.parametrize("kind", ["llama", "t5", "bert"])
def test_peft_checkpoint_loads_in_ours(tmp_dir, kind, n_splits, batch_inputs, output_tensor, randomize_):
    config = peft.PolyConfig(
        task_type=TASK_TYPES[kind], n_tasks=3, n_skills=3, n_splits=n_splits, init_weights=False,
        target_modules={"llama": ["q_proj", "v_proj", "down_proj"], "t5": ["q", "v", "wo"], "bert": ["query", "value", "intermediate.dense"]}[kind],
    )
    theirs = peft.get_peft_model(MODELS[kind](), config)
    randomize_(theirs)
    randomize_heads_(theirs, "classifier")
    theirs.eval().save_pretrained(tmp_dir)
    ours = PolyModel.from_pretrained(MODELS[kind](), tmp_dir)
    inputs = batch_inputs(kind)
    with torch.no_grad():
        expected = output_tensor(theirs(**inputs, task_ids=torch.tensor(TASKS)))
        got = output_tensor(ours(**inputs, task_ids=TASKS))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_same_seed_gives_peft_identical_initial_weights():
    torch.manual_seed(4)
    ours = get_peft_model(MODELS["llama"](), PolyConfig(n_tasks=3, n_splits=2, init_weights=False))
    torch.manual_seed(4)
    theirs = peft.get_peft_model(MODELS["llama"](), peft.PolyConfig(task_type="CAUSAL_LM", n_tasks=3, n_splits=2, init_weights=False))
    expected = peft.get_peft_model_state_dict(theirs)
    got = ours.adapter_state_dict()
    assert set(got) == set(expected)
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_training_step_matches_peft_under_the_same_seed(batch_inputs):
    """Same sampled routing, same loss, same gradients: the training path is PEFT's method exactly."""
    torch.manual_seed(0)
    ours = get_peft_model(MODELS["llama"]().train(), PolyConfig(n_tasks=3, n_splits=2, init_weights=False))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(MODELS["llama"]().train(), peft.PolyConfig(task_type="CAUSAL_LM", n_tasks=3, n_splits=2, init_weights=False))
    ours.train(), theirs.train()
    inputs = batch_inputs("llama")
    torch.manual_seed(11)
    loss_ours = ours(**inputs, labels=inputs["input_ids"], task_ids=TASKS).loss
    torch.manual_seed(11)
    loss_theirs = theirs(**inputs, labels=inputs["input_ids"], task_ids=torch.tensor(TASKS)).loss
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-6, atol=1e-6)
    loss_ours.backward()
    loss_theirs.backward()
    grads_theirs = {n.replace("base_model.model.", "").replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    grads_ours = {n.replace("model.", "", 1).replace("adapters.default.", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(grads_ours) == set(grads_theirs)
    for name, grad in grads_ours.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, grads_theirs[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_greedy_generation_equals_peft(tmp_dir, kind, batch_inputs, randomize_):
    ours = get_peft_model(MODELS[kind](), PolyConfig(n_tasks=3, n_splits=2, init_weights=False))
    randomize_(ours)
    ours.eval().save_pretrained(tmp_dir)
    theirs = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_dir).eval()
    inputs = batch_inputs(kind)
    inputs.pop("decoder_input_ids", None)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    got = ours.generate(**inputs, task_ids=TASKS, **kwargs)
    expected = theirs.generate(**inputs, task_ids=torch.tensor(TASKS), **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), rtol=1e-5, atol=1e-5)
    base = MODELS[kind]().generate(**inputs, **kwargs)
    assert not torch.allclose(torch.stack(got.scores), torch.stack(base.scores), atol=1e-3)

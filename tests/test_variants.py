"""Routing variants: config fields, PEFT compatibility, hard routing, fixed allocations, router sharing."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from tests.helpers import SMALL_MODELS as MODELS
from polytropon import FixedRouter, PolyConfig, PolyModel, PolyRouter, get_peft_model, routing_weights
from polytropon.checkpoint import WEIGHTS_NAME
from polytropon.variants import block_of, router_groups, unique_routers


def _routers(model, adapter="default"):
    return unique_routers([layer.adapters[adapter].poly_router for _, layer in model.poly_layers()])


@pytest.fixture
def _run(output_tensor, small_inputs):
    """The factory ``_run(...)`` below, built from the shared builders (fixtures)."""

    def _run(model, kind, task_ids, **kw):
        with torch.no_grad():
            return output_tensor(model(**small_inputs(kind, **kw), task_ids=task_ids))

    return _run


# ---------------------------------------------------------------------- config
def test_default_config_json_is_plain_peft(tmp_path):
    from peft import PolyConfig as PeftPolyConfig

    PolyConfig(n_tasks=3).save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in ("router_temperature", "hard_routing", "router_granularity", "allocation", "task_names", "unknown_task"):
        assert key not in data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns on keys it does not know: there must be none
        cfg = PeftPolyConfig.from_peft_type(**data)
    assert cfg.n_tasks == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(router_temperature=0.5),
        dict(hard_routing=True),
        dict(router_granularity="block"),
        dict(poly_type="private", n_tasks=3, n_skills=3),
        dict(poly_type="shared", n_skills=1),
        dict(poly_type="fixed", n_tasks=2, n_skills=2, allocation=[[1.0, 0.0], [0.5, 0.5]]),
        dict(n_tasks=2, task_names=["a", "b"], unknown_task="average"),
    ],
)
def test_non_default_fields_round_trip_through_json(tmp_path, kwargs):
    cfg = PolyConfig(**kwargs)
    cfg.save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    for key, value in kwargs.items():
        assert data[key] == value
    assert PolyConfig.from_pretrained(str(tmp_path)) == cfg


@pytest.mark.parametrize(
    "kwargs, exc, field",
    [
        (dict(router_temperature=0.0), ValueError, "router_temperature"),
        (dict(router_temperature=float("nan")), ValueError, "router_temperature"),
        (dict(router_temperature="1"), TypeError, "router_temperature"),
        (dict(hard_routing=1), TypeError, "hard_routing"),
        (dict(router_granularity="layer"), ValueError, "router_granularity"),
        (dict(unknown_task="skip"), ValueError, "unknown_task"),
        (dict(poly_type="moe"), ValueError, "poly_type"),
        (dict(poly_type="private", n_tasks=3, n_skills=4), ValueError, "n_skills"),
        (dict(poly_type="shared", n_skills=2), ValueError, "n_skills"),
        (dict(poly_type="fixed"), ValueError, "allocation"),
        (dict(poly_type="fixed", n_tasks=2, n_skills=2, allocation=[[1, 0]]), ValueError, "allocation"),
        (dict(poly_type="fixed", n_tasks=1, n_skills=2, allocation=[[1, -1]]), ValueError, "allocation"),
        (dict(poly_type="fixed", n_tasks=1, n_skills=2, allocation=[[0, 0]]), ValueError, "allocation"),
        (dict(poly_type="fixed", n_tasks=1, n_skills=2, allocation=[["a", 1]]), TypeError, "allocation"),
        (dict(allocation=[[1.0] * 4]), ValueError, "allocation"),
        (dict(poly_type="shared", n_skills=1, hard_routing=True), ValueError, "hard_routing"),
        (dict(n_tasks=2, task_names=["a"]), ValueError, "task_names"),
        (dict(n_tasks=2, task_names=["a", "a"]), ValueError, "task_names"),
        (dict(n_tasks=1, task_names="a"), TypeError, "task_names"),
        (dict(n_tasks=2, task_names=["a", 3]), TypeError, "task_names"),
    ],
)
def test_config_validation_names_the_field(kwargs, exc, field):
    with pytest.raises(exc, match=field):
        PolyConfig(**kwargs)


def test_allocation_accepts_a_tensor():
    cfg = PolyConfig(poly_type="fixed", n_tasks=2, n_skills=2, allocation=torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert cfg.allocation == [[1.0, 0.0], [1.0, 1.0]]


# ---------------------------------------------------------------------- PEFT compatibility
def test_seeded_init_matches_peft(small_llama):
    """Building routers per group must keep PEFT's order of random draws for the default config."""
    from peft import PolyConfig as PeftPolyConfig
    from peft import get_peft_model as peft_get_peft_model

    ours_base, base = small_llama(), small_llama()  # (building a model reseeds)
    torch.manual_seed(7)
    ours = get_peft_model(ours_base, PolyConfig(n_tasks=3, n_splits=2, init_weights=False))
    torch.manual_seed(7)
    theirs = peft_get_peft_model(base, PeftPolyConfig(task_type="CAUSAL_LM", n_tasks=3, n_splits=2, init_weights=False))
    ours_sd = ours.adapter_state_dict()
    theirs_sd = {k.replace(".default", ""): v for k, v in theirs.state_dict().items() if "poly_" in k}
    assert set(ours_sd) == set(theirs_sd)
    for key, tensor in ours_sd.items():
        assert torch.equal(tensor, theirs_sd[key]), key


@pytest.mark.parametrize("kind", ["llama", "t5", "bert"])  # PEFT's Poly does not support Conv1D (gpt2)
@pytest.mark.parametrize(
    "extra",
    [dict(), dict(router_granularity="block"), dict(router_temperature=0.3), dict(task_names=["a", "b", "c"], unknown_task="average")],
)
def test_peft_loads_compatible_variants_with_equal_outputs(tmp_path, kind, extra, _run, output_tensor, randomize_, small_inputs):
    from peft import PeftModel

    make = MODELS[kind]
    model = get_peft_model(make(), PolyConfig(n_tasks=3, n_skills=3, n_splits=2, **extra))
    randomize_(model)
    assert model.peft_config["default"].peft_compatible
    model.save_pretrained(str(tmp_path))
    task_ids = torch.tensor([0, 2, 1, 2])
    expected = _run(model.eval(), kind, task_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-default fields: PEFT warns that it ignores them
        theirs = PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    with torch.no_grad():
        got = output_tensor(theirs(**small_inputs(kind), task_ids=task_ids))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "extra",
    [
        dict(hard_routing=True),
        dict(router_granularity="block"),
        dict(router_granularity="model", router_temperature=2.0),
        dict(poly_type="private", n_skills=3),
        dict(poly_type="shared", n_skills=1),
        dict(poly_type="fixed", allocation=[[1, 1, 0], [0, 1, 1], [0.2, 0.3, 0.5]]),
        dict(task_names=["x", "y", "z"], unknown_task="average"),
    ],
)
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_variants_round_trip_through_polytropon(tmp_path, kind, extra, _run, randomize_):
    extra = dict(extra)  # shared between parametrized cases
    cfg = PolyConfig(n_tasks=3, n_skills=extra.pop("n_skills", 3), n_splits=2, **extra)
    model = get_peft_model(MODELS[kind](), cfg)
    randomize_(model)
    if cfg.hard_routing:  # logits away from 0 so that several skills are active or not
        with torch.no_grad():
            for router in _routers(model):
                router.module_logits.copy_(torch.randn(router.module_logits.shape) * 3)
    model.save_pretrained(str(tmp_path))
    saved = PolyConfig.from_pretrained(str(tmp_path))
    assert dataclasses.replace(saved, inference_mode=False) == model.peft_config["default"]  # saved for inference
    task_ids = [0, 2, 1, 1]
    expected = _run(model.eval(), kind, task_ids)
    loaded = PolyModel.from_pretrained(MODELS[kind](), str(tmp_path))
    torch.testing.assert_close(_run(loaded, kind, task_ids), expected, atol=1e-6, rtol=1e-6)
    # fixed-allocation routers save no tensor at all; shared routers are written once per layer
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / WEIGHTS_NAME)).keys()
    n_router_keys = sum(k.endswith("module_logits") for k in keys)
    assert n_router_keys == (len(list(model.poly_layers())) if cfg.poly_type == "poly" else 0)
    assert model.peft_config["default"].peft_compatible == (cfg.poly_type == "poly" and not cfg.hard_routing)


# ---------------------------------------------------------------------- fixed allocations
def test_private_routing_uses_one_skill_per_task(_run, randomize_, small_llama):
    model = get_peft_model(small_llama(), PolyConfig(poly_type="private", n_tasks=3, n_skills=3, n_splits=2))
    randomize_(model)
    for weights in routing_weights(model).values():
        torch.testing.assert_close(weights, torch.eye(3)[:, None, :].expand(3, 2, 3), atol=0, rtol=0)
    model.eval()
    before = _run(model, "llama", [0, 1, 2, 0])
    with torch.no_grad():  # change skill 1 only: task 1 changes, tasks 0 and 2 do not
        for _, layer in model.poly_layers():
            layer.adapters["default"].poly_lora_B[:, 1] += 1.0
    after = _run(model, "llama", [0, 1, 2, 0])
    torch.testing.assert_close(after[[0, 2, 3]], before[[0, 2, 3]], atol=0, rtol=0)
    assert (after[1] - before[1]).abs().max() > 1e-3
    assert model.get_nb_trainable_parameters()[0] == sum(
        layer.adapters["default"].poly_lora_A.numel() + layer.adapters["default"].poly_lora_B.numel()
        for _, layer in model.poly_layers()
    )


def test_shared_routing_gives_every_task_the_same_output(_run, output_tensor, randomize_, small_inputs, small_llama):
    model = get_peft_model(small_llama(), PolyConfig(poly_type="shared", n_tasks=4, n_skills=1))
    randomize_(model)
    out = _run(model.eval(), "llama", [0, 1, 2, 3], seed=0)
    same_input = {k: v[:1].expand(4, -1) for k, v in small_inputs("llama").items()}
    with torch.no_grad():
        out = output_tensor(model(**same_input, task_ids=[0, 1, 2, 3]))
    for t in range(1, 4):
        torch.testing.assert_close(out[t], out[0], atol=0, rtol=0)
    for weights in routing_weights(model).values():
        assert torch.equal(weights, torch.ones(4, 1, 1))


def test_fixed_allocation_is_normalised_and_not_trained(small_llama):
    allocation = [[1, 0, 1, 0], [0, 0, 0, 2], [0.1, 0.2, 0.3, 0.4]]
    model = get_peft_model(small_llama(), PolyConfig(poly_type="fixed", n_tasks=3, n_skills=4, allocation=allocation))
    expected = torch.tensor([[0.5, 0, 0.5, 0], [0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4]])
    model.train()
    for _, layer in model.poly_layers():
        router = layer.adapters["default"].poly_router
        assert isinstance(router, FixedRouter) and not list(router.parameters())
        torch.testing.assert_close(router(torch.arange(3))[:, 0], expected)  # training mode too


# ---------------------------------------------------------------------- learned routing options
def test_hard_routing_forward_is_binary_and_passes_gradients():
    torch.manual_seed(0)
    router = PolyRouter(n_tasks=5, n_skills=6, n_splits=2, hard=True, temperature=0.5)
    with torch.no_grad():
        router.module_logits.copy_(torch.randn(5, 12) * 2)
    for mode in ("train", "eval"):
        router.train(mode == "train")
        weights = router(torch.arange(5))
        mask = weights > 0
        assert mask.any(dim=-1).all()  # every split keeps at least one skill
        counts = mask.sum(dim=-1, keepdim=True).to(weights.dtype)
        # forward value: the 0/1 allocation averaged over its active skills, exactly
        assert torch.equal(weights, mask.to(weights.dtype) / counts)
    eval_mask = router.eval_weights(torch.arange(5)) > 0
    logits3 = router.module_logits.view(5, 2, 6)
    has_positive = (logits3 >= 0).any(-1, keepdim=True)
    assert torch.equal(eval_mask, torch.where(has_positive, logits3 >= 0, logits3 == logits3.max(-1, keepdim=True).values))
    router.train()
    target = torch.randn(5, 2, 6)
    (router(torch.arange(5)) * target).sum().backward()
    grad = router.module_logits.grad
    assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()


def test_hard_routing_trains_end_to_end(small_inputs, small_llama):
    model = get_peft_model(small_llama(), PolyConfig(n_tasks=2, hard_routing=True, init_weights=False))
    model.train()
    out = model(**small_inputs("llama"), task_ids=[0, 1, 0, 1], labels=small_inputs("llama")["input_ids"])
    out.loss.backward()
    grads = [r.module_logits.grad for r in _routers(model)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_router_temperature_is_used_in_training():
    router = PolyRouter(n_tasks=2, n_skills=4, temperature=0.05)
    with torch.no_grad():
        router.module_logits.copy_(torch.tensor([[2.0, -2.0, 0.5, -0.5], [0.0, 1.0, -1.0, 3.0]]))
    router.train()
    torch.manual_seed(3)
    got = router(torch.tensor([0, 1] * 200))
    from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

    torch.manual_seed(3)
    probs = RelaxedBernoulli(0.05, logits=router.module_logits[torch.tensor([0, 1] * 200)].view(-1, 1, 4)).rsample()
    torch.testing.assert_close(got, probs / (probs.sum(-1, keepdim=True) + 1e-12))
    # at a low temperature the samples are nearly binary
    assert ((probs < 0.01) | (probs > 0.99)).float().mean() > 0.8


# ---------------------------------------------------------------------- router granularity
def test_block_of_paths():
    assert block_of("model.layers.3.self_attn.q_proj") == "model.layers.3"
    assert block_of("transformer.h.0.attn.c_attn") == "transformer.h.0"
    assert block_of("encoder.block.1.layer.0.SelfAttention.q") == "encoder.block.1"
    assert block_of("bert.encoder.layer.2.attention.self.query") == "bert.encoder.layer.2"
    assert block_of("lm_head") is None
    groups = router_groups(["a.0.q", "a.0.v", "a.1.q", "lm_head"], "block")
    assert groups == {"a.0.q": "a.0", "a.0.v": "a.0", "a.1.q": "a.1", "lm_head": "lm_head"}
    with pytest.raises(ValueError, match="router_granularity"):
        router_groups(["a"], "layer")


@pytest.mark.parametrize("granularity, n_routers", [("module", 12), ("block", 4), ("model", 1)])
def test_router_granularity_shares_routers(granularity, n_routers, small_t5):
    model = get_peft_model(small_t5(), PolyConfig(n_tasks=3, router_granularity=granularity))
    assert len(_routers(model)) == n_routers  # t5: q, v in 2 encoder blocks, self- and cross-attention q, v in 2 decoder blocks
    logits_params = n_routers * 3 * 4
    skills = sum(p.numel() for n, p in model.named_parameters() if "poly_lora" in n)
    assert model.get_nb_trainable_parameters()[0] == skills + logits_params


@pytest.mark.parametrize("training", [False, True])
def test_shared_router_runs_once_per_call(training, small_inputs, small_llama):
    model = get_peft_model(small_llama(layers=3), PolyConfig(n_tasks=3, router_granularity="model"))
    (router,) = _routers(model)
    calls = []
    for name in ("_sample", "_eval"):  # the two routing computations (training sample, eval weights)
        original = getattr(router, name)
        setattr(router, name, lambda ids, original=original: (calls.append(1), original(ids))[1])
    model.train(training)
    model(**small_inputs("llama"), task_ids=[0, 1, 2, 0])
    assert len(calls) == 1  # 6 adapted layers, one routing computation
    model(**small_inputs("llama"), task_ids=[0, 1, 2, 0])
    assert len(calls) == 2  # the next call computes again
    assert model.routing.call_store() is None  # nothing kept once the call is over


def test_shared_router_uses_one_sample_per_call_in_training(small_inputs, small_llama):
    model = get_peft_model(small_llama(), PolyConfig(n_tasks=3, router_granularity="model", init_weights=False))
    (router,) = _routers(model)
    seen = []
    router.register_forward_hook(lambda module, args, out: seen.append(out))
    model.train()
    model(**small_inputs("llama"), task_ids=[0, 1, 2, 0])
    assert len(seen) == 4 and all(w is seen[0] for w in seen)


def test_loading_untied_router_copies_into_a_shared_router_is_refused(tmp_path, randomize_, small_llama):
    model = get_peft_model(small_llama(), PolyConfig(n_tasks=3))  # one router per module
    randomize_(model)
    model.save_pretrained(str(tmp_path))
    cfg = PolyConfig.from_pretrained(str(tmp_path))
    cfg.router_granularity = "block"
    base = small_llama()
    with pytest.raises(ValueError, match="different values"):
        PolyModel.from_pretrained(base, str(tmp_path), config=cfg)
    assert not any("Poly" in type(m).__name__ for m in base.modules())  # base untouched


def test_activation_checkpointing_needs_per_module_routers(small_inputs, small_llama):
    """Per-module routers train under checkpointing; shared routers refuse it with a clear error."""
    x = small_inputs("llama")["input_ids"]
    for granularity, adapter_mode in (("module", True), ("block", True), ("block", False)):
        base = small_llama()
        base.gradient_checkpointing_enable()
        model = get_peft_model(base, PolyConfig(n_tasks=3, init_weights=False, router_granularity=granularity))
        model.train()
        for _, layer in model.poly_layers():  # eval routing inside checkpointed layers that train
            layer.adapters["default"].train(adapter_mode)
        loss = model(input_ids=x, labels=x, task_ids=[0, 1, 2, 0]).loss
        if granularity == "module":
            loss.backward()
            assert all(r.module_logits.grad is not None and r.module_logits.grad.abs().sum() > 0 for r in _routers(model))
        else:
            with pytest.raises(RuntimeError, match="router_granularity='module'"):
                loss.backward()


@pytest.mark.parametrize(
    "extra", [dict(poly_type="private", n_skills=3), dict(poly_type="fixed", n_skills=2, allocation=[[1, 0], [0, 1], [1, 1]])]
)
def test_peft_refuses_fixed_allocation_checkpoints(tmp_path, extra, small_llama):
    """docs/research.md: PEFT cannot load these variants, and says so instead of computing something else."""
    from peft import PeftModel

    model = get_peft_model(small_llama(), PolyConfig(n_tasks=3, **extra))
    assert not model.peft_config["default"].peft_compatible
    model.save_pretrained(str(tmp_path))
    with warnings.catch_warnings(), pytest.raises(ValueError, match="poly_type"):
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(small_llama(), str(tmp_path))

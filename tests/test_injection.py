"""injection.py: the plan (finds and checks targets, changes nothing), the injection, unloading and the trainable
set -- through ``get_peft_model`` and directly on the module's functions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.helpers import MODELS
from transformers.pytorch_utils import Conv1D

from polytropon import PolyConfig, PolyLayer, get_peft_model
from polytropon import injection
from polytropon.modules_to_save import ModulesToSave
from polytropon.routing import RoutingState


def adapted_names(model):
    return sorted(name for name, module in model.named_modules() if isinstance(module, PolyLayer))


def snapshot(model):
    """Everything ``plan_injection`` must leave alone: module tree, tensors, requires_grad."""
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    )


def assert_same(model, before):
    modules, params = before
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for name, (value, grad) in params.items():
        assert now[name].requires_grad == grad, name
        torch.testing.assert_close(now[name].detach(), value, rtol=0, atol=0)


# --------------------------------------------------------------------------- through get_peft_model


@pytest.mark.parametrize(
    "kind,leaves,count",
    [("llama", {"q_proj", "v_proj"}, 4), ("gpt2", {"c_attn"}, 2), ("t5", {"q", "v"}, 12), ("bert", {"query", "value"}, 4)],
)
def test_default_targets_per_architecture(kind, leaves, count):
    # t5: 2 encoder blocks x (self) + 2 decoder blocks x (self + cross), each q and v
    names = adapted_names(get_peft_model(MODELS[kind](), PolyConfig(n_tasks=2)))
    assert {n.rsplit(".", 1)[1] for n in names} == leaves
    assert len(names) == count


def test_list_targets_match_last_components_and_regex_matches_full_name(tiny_llama):
    model = get_peft_model(tiny_llama(), PolyConfig(target_modules=["self_attn.o_proj", "up_proj"]))
    assert adapted_names(model) == sorted(
        f"model.model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.up_proj")
    )
    model = get_peft_model(tiny_llama(), PolyConfig(target_modules=r"model\.layers\.1\.self_attn\.(q|k)_proj"))
    assert adapted_names(model) == ["model.model.layers.1.self_attn.k_proj", "model.model.layers.1.self_attn.q_proj"]


def test_exclude_modules(tiny_llama):
    model = get_peft_model(tiny_llama(), PolyConfig(target_modules=["q_proj"], exclude_modules=["layers.0.self_attn.q_proj"]))
    assert adapted_names(model) == ["model.model.layers.1.self_attn.q_proj"]


def test_targets_matching_nothing_raise_and_leave_model_unchanged(tiny_llama):
    base = tiny_llama()
    before = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="nonexistent"):
        get_peft_model(base, PolyConfig(target_modules=["nonexistent"]))
    assert [n for n, _ in base.named_modules()] == before
    assert all(p.requires_grad for p in base.parameters())


def test_n_splits_must_divide_widths_named_in_error(tiny_llama):
    with pytest.raises(ValueError, match=r"n_splits=3.*in_features=32.*q_proj"):
        get_peft_model(tiny_llama(), PolyConfig(target_modules=["q_proj"], n_splits=3))


def test_unsupported_layer_type_is_a_type_error_naming_module(tiny_llama):
    with pytest.raises(TypeError, match=r"embed_tokens.*Embedding"):
        get_peft_model(tiny_llama(), PolyConfig(target_modules=["embed_tokens"]))


def test_only_adapters_train_and_counts(tiny_llama):
    model = get_peft_model(tiny_llama(), PolyConfig(target_modules=["q_proj", "v_proj"], n_tasks=3, n_skills=4, n_splits=2, r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("poly_lora" in n) or ("module_logits" in n) for n in trainable)
    # per layer: A (2,4,16,4) + B (2,4,4,out/2) + logits (3, 8); q_proj out 32, v_proj out 16 (2 kv heads * 8)
    per_q = 2 * 4 * 16 * 4 + 2 * 4 * 4 * 16 + 3 * 8
    per_v = 2 * 4 * 16 * 4 + 2 * 4 * 4 * 8 + 3 * 8
    n_trainable, n_total = model.get_nb_trainable_parameters()
    assert n_trainable == 2 * (per_q + per_v)
    assert n_total == sum(p.numel() for p in model.parameters())


def test_task_type_is_inferred(tiny_llama, tiny_gpt2, tiny_t5, tiny_bert_cls):
    assert get_peft_model(tiny_llama(), PolyConfig()).peft_config["default"].task_type == "CAUSAL_LM"
    assert get_peft_model(tiny_gpt2(), PolyConfig()).peft_config["default"].task_type == "CAUSAL_LM"
    assert get_peft_model(tiny_t5(), PolyConfig()).peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    assert get_peft_model(tiny_bert_cls(), PolyConfig()).peft_config["default"].task_type == "SEQ_CLS"
    from transformers import BertConfig, BertModel

    bare = BertModel(BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    assert get_peft_model(bare, PolyConfig()).peft_config["default"].task_type == "FEATURE_EXTRACTION"


def test_seq_cls_trains_the_classifier_head_like_peft(tiny_bert_cls):
    model = get_peft_model(tiny_bert_cls(), PolyConfig(n_tasks=2))
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.classifier.modules_to_save.default.weight" in trainable
    assert "model.classifier.original_module.weight" not in trainable


def test_modules_to_save_name_matching_nothing_is_rejected(tiny_llama):
    with pytest.raises(ValueError, match="lm_headx"):
        get_peft_model(tiny_llama(), PolyConfig(modules_to_save=["lm_headx"]))


def test_new_adapter_is_not_trainable_until_set(tiny_llama):
    model = get_peft_model(tiny_llama(), PolyConfig())
    model.add_adapter("b", PolyConfig())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
    model.set_adapter("b")
    assert all(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)


# --------------------------------------------------------------------------- the module's functions


def test_plan_injection_resolves_the_config_and_changes_nothing(tiny_llama):
    base = tiny_llama()
    before = snapshot(base)
    config = PolyConfig(n_tasks=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    plan = injection.plan_injection(base, config)
    assert_same(base, before)
    assert config.task_type is None  # the caller's config is not filled in: the plan holds a copy
    assert plan.config is not config and plan.config.task_type == "CAUSAL_LM"
    assert [path for path, _ in plan.targets] == [
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")
    ]
    assert all(module is base.get_submodule(path) for path, module in plan.targets)
    assert [(path, module) for path, module in plan.saved] == [("lm_head", base.lm_head)]


@pytest.mark.parametrize(
    "config,error,pattern",
    [
        (PolyConfig(target_modules=["nonexistent"]), ValueError, "nonexistent"),
        (PolyConfig(target_modules=["q_proj"], n_splits=3), ValueError, r"n_splits=3.*in_features=32.*q_proj"),
        (PolyConfig(target_modules=["embed_tokens"]), TypeError, r"embed_tokens.*Embedding"),
        (PolyConfig(modules_to_save=["lm_headx"]), ValueError, "lm_headx"),
        ({"r": 4}, TypeError, "PolyConfig.*dict"),
    ],
)
def test_plan_injection_raises_before_any_change(tiny_llama, config, error, pattern):
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(error, match=pattern):
        injection.plan_injection(base, config)
    assert_same(base, before)


def test_plan_of_an_adapted_model_targets_its_poly_layers_and_saved_wrappers(tiny_llama):
    model = get_peft_model(tiny_llama(), PolyConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    plan = injection.plan_injection(model.model, PolyConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert all(isinstance(module, PolyLayer) for _, module in plan.targets)
    assert [type(module) for _, module in plan.saved] == [ModulesToSave]


def test_inject_draws_the_same_adapter_as_get_peft_model_and_unload_restores_the_base(tiny_llama, batch_inputs):
    config = PolyConfig(n_tasks=3, n_skills=2, n_splits=2, init_weights=False, target_modules=["q_proj", "down_proj"])
    reference_base = tiny_llama()
    torch.manual_seed(5)
    reference = get_peft_model(reference_base, config).adapter_state_dict()
    base = tiny_llama()
    originals = {path: base.get_submodule(path) for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")}
    with torch.no_grad():
        expected = base(**batch_inputs("llama")).logits
    state = RoutingState(active_adapter="default")
    plan = injection.plan_injection(base, config)
    torch.manual_seed(5)
    injection.inject(base, state, "default", plan)
    layers = dict(injection.poly_layers(base))
    assert sorted(layers) == sorted(path for path, _ in plan.targets)
    assert all(layers[path].base_layer is module for path, module in originals.items())
    tensors = {key.removeprefix("base_model.model."): value for key, value in reference.items()}
    for path, layer in layers.items():  # the same random numbers, drawn in the same order
        adapter = layer.adapters["default"]
        assert adapter.poly_lora_B.abs().sum() > 0
        torch.testing.assert_close(adapter.poly_lora_A, tensors[f"{path}.poly_lora_A"], rtol=0, atol=0)
        torch.testing.assert_close(adapter.poly_lora_B, tensors[f"{path}.poly_lora_B"], rtol=0, atol=0)
        torch.testing.assert_close(
            adapter.poly_router.module_logits, tensors[f"{path}.poly_router.module_logits"], rtol=0, atol=0
        )
    assert injection.unload(base) is base
    assert not list(injection.poly_layers(base))
    assert all(base.get_submodule(path) is module for path, module in originals.items())
    with torch.no_grad():
        torch.testing.assert_close(base(**batch_inputs("llama")).logits, expected, rtol=0, atol=0)


def test_a_second_adapter_goes_into_the_existing_layers_and_remove_adapter_takes_it_out(tiny_llama):
    model = get_peft_model(tiny_llama(), PolyConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    layers_before = dict(injection.poly_layers(model.model))
    plan = injection.plan_injection(model.model, PolyConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    injection.inject(model.model, model.routing, "other", plan)
    layers = dict(injection.poly_layers(model.model))
    assert all(layers[path] is layer for path, layer in layers_before.items())
    assert all(sorted(layer.adapters) == ["default", "other"] for layer in layers.values())
    (_, wrapper), = injection.saved_modules(model.model)
    assert sorted(wrapper.modules_to_save) == ["default", "other"]
    injection.remove_adapter(model.model, "other")
    assert all(list(layer.adapters) == ["default"] for layer in layers.values())
    assert list(wrapper.modules_to_save) == ["default"]


def test_unload_keeps_the_copy_of_the_named_adapter(tiny_llama):
    model = get_peft_model(tiny_llama(), PolyConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    (_, wrapper), = injection.saved_modules(model.model)
    copy, original = wrapper.modules_to_save["default"], wrapper.original_module
    with torch.no_grad():
        copy.weight.add_(1.0)
    inner = model.model
    injection.unload(inner, keep_copy_of="default")
    assert inner.lm_head is copy
    model = get_peft_model(tiny_llama(), PolyConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    (_, wrapper), = injection.saved_modules(model.model)
    original = wrapper.original_module
    assert injection.unload(model.model, keep_copy_of="absent").lm_head is original


def test_walk_does_not_descend_into_wrappers(tiny_llama):
    model = get_peft_model(tiny_llama(), PolyConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    paths = [path for path, _ in injection.walk(model.model)]
    assert "model.layers.0.self_attn.q_proj" in paths and "lm_head" in paths
    assert not any(p.startswith(("model.layers.0.self_attn.q_proj.", "lm_head.")) for p in paths)
    assert [p for p, _ in injection.poly_layers(model.model)] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]


def test_update_trainable_and_freeze_skills(tiny_llama):
    model = get_peft_model(tiny_llama(), PolyConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model.add_adapter("other", PolyConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    configs = model.peft_config
    injection.update_trainable(model.model, configs, None)
    assert not any(p.requires_grad for p in model.parameters())
    injection.update_trainable(model.model, configs, "other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    assert any("lm_head.modules_to_save.other" in n for n in trainable)
    frozen = {"other": dataclasses.replace(configs["other"], inference_mode=True), "default": configs["default"]}
    injection.update_trainable(model.model, frozen, "other")
    assert not any(p.requires_grad for p in model.parameters())

    injection.update_trainable(model.model, configs, "other")
    with pytest.raises(ValueError, match="'default' is not trainable"):
        injection.freeze_skills(model.model, configs, "default", "other")
    injection.freeze_skills(model.model, configs, "other", "other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("poly_router.module_logits") and ".other." in n for n in trainable)
    fixed = {"other": dataclasses.replace(configs["other"], poly_type="shared", n_skills=1)}
    with pytest.raises(ValueError, match="fixed allocation.*'shared'"):
        injection.freeze_skills(model.model, fixed, "other", "other")


def test_count_parameters():
    params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4), requires_grad=False)]
    assert injection.count_parameters(params) == (6, 10)
    assert injection.count_parameters([]) == (0, 0)


def test_replace_module_and_freeze_base(tiny_llama):
    base = tiny_llama()
    new = Conv1D(32, 32)
    injection.replace_module(base, "model.layers.0.self_attn.q_proj", new)
    assert base.model.layers[0].self_attn.q_proj is new
    injection.freeze_base(base)
    assert not any(p.requires_grad for p in base.parameters())

import copy

import pytest
import torch
from tests.helpers import MODELS, batch_inputs, output_tensor, randomize_, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5

from polytropon import PolyConfig, PolyLayer, PolyModel, get_peft_model


def adapted_names(model):
    return sorted(name for name, module in model.named_modules() if isinstance(module, PolyLayer))


@pytest.mark.parametrize(
    "kind,leaves,count",
    [("llama", {"q_proj", "v_proj"}, 4), ("gpt2", {"c_attn"}, 2), ("t5", {"q", "v"}, 12), ("bert", {"query", "value"}, 4)],
)
def test_default_targets_per_architecture(kind, leaves, count):
    # t5: 2 encoder blocks x (self) + 2 decoder blocks x (self + cross), each q and v
    names = adapted_names(get_peft_model(MODELS[kind](), PolyConfig(n_tasks=2)))
    assert {n.rsplit(".", 1)[1] for n in names} == leaves
    assert len(names) == count


def test_list_targets_match_last_components_and_regex_matches_full_name():
    model = get_peft_model(tiny_llama(), PolyConfig(target_modules=["self_attn.o_proj", "up_proj"]))
    assert adapted_names(model) == sorted(
        f"model.model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.up_proj")
    )
    model = get_peft_model(tiny_llama(), PolyConfig(target_modules=r"model\.layers\.1\.self_attn\.(q|k)_proj"))
    assert adapted_names(model) == ["model.model.layers.1.self_attn.k_proj", "model.model.layers.1.self_attn.q_proj"]


def test_exclude_modules():
    model = get_peft_model(tiny_llama(), PolyConfig(target_modules=["q_proj"], exclude_modules=["layers.0.self_attn.q_proj"]))
    assert adapted_names(model) == ["model.model.layers.1.self_attn.q_proj"]


def test_targets_matching_nothing_raise_and_leave_model_unchanged():
    base = tiny_llama()
    before = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="nonexistent"):
        get_peft_model(base, PolyConfig(target_modules=["nonexistent"]))
    assert [n for n, _ in base.named_modules()] == before
    assert all(p.requires_grad for p in base.parameters())


def test_n_splits_must_divide_widths_named_in_error():
    with pytest.raises(ValueError, match=r"n_splits=3.*in_features=32.*q_proj"):
        get_peft_model(tiny_llama(), PolyConfig(target_modules=["q_proj"], n_splits=3))


def test_unsupported_layer_type_is_a_type_error_naming_module():
    with pytest.raises(TypeError, match=r"embed_tokens.*Embedding"):
        get_peft_model(tiny_llama(), PolyConfig(target_modules=["embed_tokens"]))


def test_only_adapters_train_and_counts():
    model = get_peft_model(tiny_llama(), PolyConfig(target_modules=["q_proj", "v_proj"], n_tasks=3, n_skills=4, n_splits=2, r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("poly_lora" in n) or ("module_logits" in n) for n in trainable)
    # per layer: A (2,4,16,4) + B (2,4,4,out/2) + logits (3, 8); q_proj out 32, v_proj out 16 (2 kv heads * 8)
    per_q = 2 * 4 * 16 * 4 + 2 * 4 * 4 * 16 + 3 * 8
    per_v = 2 * 4 * 16 * 4 + 2 * 4 * 4 * 8 + 3 * 8
    n_trainable, n_total = model.get_nb_trainable_parameters()
    assert n_trainable == 2 * (per_q + per_v)
    assert n_total == sum(p.numel() for p in model.parameters())


def test_print_trainable_parameters(capsys):
    model = get_peft_model(tiny_llama(), PolyConfig())
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    trainable, total = model.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,d}" in out and f"all params: {total:,d}" in out


def test_attribute_fallthrough_and_base_model():
    base = tiny_llama()
    model = get_peft_model(base, PolyConfig())
    assert model.config is base.config
    assert model.get_base_model() is base
    with pytest.raises(AttributeError):
        model.no_such_attribute


def test_task_type_is_inferred():
    assert get_peft_model(tiny_llama(), PolyConfig()).peft_config["default"].task_type == "CAUSAL_LM"
    assert get_peft_model(tiny_gpt2(), PolyConfig()).peft_config["default"].task_type == "CAUSAL_LM"
    assert get_peft_model(tiny_t5(), PolyConfig()).peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    assert get_peft_model(tiny_bert_cls(), PolyConfig()).peft_config["default"].task_type == "SEQ_CLS"
    from transformers import BertConfig, BertModel

    bare = BertModel(BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    assert get_peft_model(bare, PolyConfig()).peft_config["default"].task_type == "FEATURE_EXTRACTION"


def test_seq_cls_trains_the_classifier_head_like_peft():
    model = get_peft_model(tiny_bert_cls(), PolyConfig(n_tasks=2))
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.classifier.modules_to_save.default.weight" in trainable
    assert "model.classifier.original_module.weight" not in trainable


def test_modules_to_save_name_matching_nothing_is_rejected():
    with pytest.raises(ValueError, match="lm_headx"):
        get_peft_model(tiny_llama(), PolyConfig(modules_to_save=["lm_headx"]))


def test_add_set_delete_disable_adapters():
    base = tiny_llama()
    inputs = batch_inputs("llama")
    with torch.no_grad():
        base_logits = base(**inputs).logits
    model = get_peft_model(base, PolyConfig(n_tasks=2, init_weights=False))
    model.add_adapter("other", PolyConfig(n_tasks=3, init_weights=False, target_modules=["k_proj"]))
    randomize_(model)
    assert model.active_adapter == "default"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    task_ids = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        out_default = model(**inputs, task_ids=task_ids).logits
        model.set_adapter("other")
        assert all(".other." in n for n, p in model.named_parameters() if p.requires_grad)
        out_other = model(**inputs, task_ids=torch.tensor([2, 1, 0, 2])).logits
        with pytest.raises(ValueError, match="n_tasks=2"):
            model.set_adapter("default")
            model(**inputs, task_ids=torch.tensor([2, 0, 0, 0]))
        with model.disable_adapter():
            disabled = model(**inputs).logits
        model.set_adapter("default")
        again = model(**inputs, task_ids=task_ids).logits
    assert not torch.allclose(out_default, base_logits, atol=1e-3)
    assert not torch.allclose(out_other, out_default, atol=1e-3)
    torch.testing.assert_close(disabled, base_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, out_default, rtol=0, atol=0)
    model.delete_adapter("default")
    assert model.active_adapter == "other" and list(model.peft_config) == ["other"]
    assert not any(".default." in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="unknown adapter 'default'"):
        model.set_adapter("default")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("other", PolyConfig())


def test_new_adapter_is_not_trainable_until_set():
    model = get_peft_model(tiny_llama(), PolyConfig())
    model.add_adapter("b", PolyConfig())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
    model.set_adapter("b")
    assert all(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)


def test_modules_to_save_copy_is_used_and_original_kept():
    base = tiny_llama()
    model = get_peft_model(base, PolyConfig(modules_to_save=["lm_head"]))
    head = model.model.lm_head
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    inputs = batch_inputs("llama")
    with torch.no_grad():
        routed = model(**inputs, task_ids=[0, 0, 0, 0]).logits
        with model.disable_adapter():
            plain = model(**inputs).logits
    assert not torch.allclose(routed, plain)
    assert model.model.lm_head.weight is head.modules_to_save["default"].weight


def test_pickle_free_deepcopy_keeps_routing_shared():
    model = get_peft_model(tiny_llama(), PolyConfig(n_tasks=2))
    clone = copy.deepcopy(model)
    layers = [m for m in clone.modules() if isinstance(m, PolyLayer)]
    assert all(layer.routing is clone.routing for layer in layers)
    with torch.no_grad():
        clone(**batch_inputs("llama"), task_ids=[0, 1, 0, 1])

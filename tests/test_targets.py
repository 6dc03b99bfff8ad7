"""Which modules get adapters: name matching, the default targets of each architecture (PEFT's own table, on
tiny models of several families built offline from configs) and the task type inferred from the model class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polytropon import PolyConfig, get_peft_model
from polytropon.targets import DEFAULT_TARGET_MODULES, default_target_modules, infer_task_type, matches

SMALL = dict(vocab_size=64)


def tiny(family: str, head: str = "") -> nn.Module:
    """A 2-layer model of ``family`` (hidden 16) with the head class ``<Family><head>``, randomly initialised."""
    import transformers as tf

    configs = {
        "llama": ("Llama", tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, **SMALL)),
        "mistral": ("Mistral", tf.MistralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, **SMALL)),
        "qwen2": ("Qwen2", tf.Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, **SMALL)),
        "gpt2": ("GPT2", tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, **SMALL)),
        "opt": ("OPT", tf.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32, **SMALL)),
        "bloom": ("Bloom", tf.BloomConfig(hidden_size=16, n_layer=2, n_head=2, **SMALL)),
        "bert": ("Bert", tf.BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32, **SMALL)),
        "distilbert": ("DistilBert", tf.DistilBertConfig(dim=16, hidden_dim=32, n_layers=2, n_heads=2, max_position_embeddings=32, **SMALL)),
        "t5": ("T5", tf.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2, **SMALL)),
        "bart": ("Bart", tf.BartConfig(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, **SMALL)),
    }
    prefix, config = configs[family]
    torch.manual_seed(0)
    return getattr(tf, prefix + head)(config).eval()


CAUSAL = {"llama": "ForCausalLM", "mistral": "ForCausalLM", "qwen2": "ForCausalLM", "gpt2": "LMHeadModel", "opt": "ForCausalLM",
          "bloom": "ForCausalLM", "bert": "ForSequenceClassification", "distilbert": "ForSequenceClassification",
          "t5": "ForConditionalGeneration", "bart": "ForConditionalGeneration"}


# --------------------------------------------------------------------------- matches


def test_a_list_selects_whole_names_and_dotted_suffixes():
    path = "model.layers.0.self_attn.q_proj"
    assert matches(path, ["q_proj"]) and matches(path, ["self_attn.q_proj"]) and matches(path, [path])
    assert not matches(path, ["proj"]) and not matches(path, ["attn.q_proj"]) and not matches(path, ["k_proj", "v_proj"])
    assert not matches(path, []) and not matches(path, None)


def test_a_string_is_a_regular_expression_over_the_whole_name():
    path = "model.layers.0.self_attn.q_proj"
    assert matches(path, r".*\.(q|v)_proj") and matches(path, r"model\.layers\.0\..*")
    assert not matches(path, r"q_proj") and not matches(path, r".*layers\.1\..*")


# --------------------------------------------------------------------------- default targets


@pytest.mark.parametrize("family", list(CAUSAL))
def test_default_targets_are_peft_s_and_select_the_attention_projections(family):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_POLY_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model = tiny(family, CAUSAL[family])
    model_type = model.config.model_type
    targets = default_target_modules(model)
    assert targets == DEFAULT_TARGET_MODULES[model_type]
    if family != "distilbert":  # PEFT has no default for distilbert
        assert targets == PEFT_DEFAULTS[model_type]
    expected = {path for path, module in model.named_modules() if matches(path, targets)}
    assert expected and len(expected) >= 2  # every layer (and every stack of an encoder-decoder) has them
    poly = get_peft_model(model, PolyConfig(n_tasks=2, n_skills=2, r=2))
    assert {path for path, _ in poly.poly_layers()} == expected
    assert poly.peft_config["default"].target_modules == targets


def test_the_default_list_is_a_copy():
    model = tiny("llama", "ForCausalLM")
    default_target_modules(model).append("o_proj")
    assert default_target_modules(model) == ["q_proj", "v_proj"]


def test_an_architecture_without_defaults_asks_for_target_modules():
    from transformers import FunnelConfig, FunnelModel

    funnel = FunnelModel(FunnelConfig(vocab_size=32, block_sizes=[1], d_model=16, n_head=2, d_head=8, d_inner=32, num_decoder_layers=1))
    with pytest.raises(ValueError, match=r"no default target_modules for model_type 'funnel': pass PolyConfig\(target_modules="):
        default_target_modules(funnel)
    with pytest.raises(ValueError, match="model_type None"):
        default_target_modules(nn.Sequential(nn.Linear(4, 4)))
    before = {name: p.clone() for name, p in funnel.named_parameters()}
    with pytest.raises(ValueError, match="'funnel'"):
        get_peft_model(funnel, PolyConfig(n_tasks=2))
    assert not any("poly" in name for name, _ in funnel.named_modules())  # nothing was changed
    assert all(torch.equal(p, before[name]) for name, p in funnel.named_parameters())
    # explicit targets work for it
    poly = get_peft_model(funnel, PolyConfig(n_tasks=2, n_skills=2, r=2, target_modules=["q_head", "v_head"]))
    assert len(list(poly.poly_layers())) == 4  # the encoder's and the decoder's


# --------------------------------------------------------------------------- task type


@pytest.mark.parametrize(
    "family, head, task_type",
    [
        ("llama", "ForCausalLM", "CAUSAL_LM"),
        ("gpt2", "LMHeadModel", "CAUSAL_LM"),
        ("opt", "ForCausalLM", "CAUSAL_LM"),
        ("bert", "LMHeadModel", "CAUSAL_LM"),  # a decoder-only LM head on an encoder family
        ("t5", "ForConditionalGeneration", "SEQ_2_SEQ_LM"),
        ("bart", "ForConditionalGeneration", "SEQ_2_SEQ_LM"),
        ("bert", "ForSequenceClassification", "SEQ_CLS"),
        ("llama", "ForSequenceClassification", "SEQ_CLS"),
        ("distilbert", "ForSequenceClassification", "SEQ_CLS"),
        ("bert", "ForTokenClassification", "TOKEN_CLS"),
        ("bert", "ForQuestionAnswering", "QUESTION_ANS"),
        ("bert", "Model", "FEATURE_EXTRACTION"),
        ("t5", "EncoderModel", "FEATURE_EXTRACTION"),
        ("llama", "Model", "FEATURE_EXTRACTION"),
    ],
)
def test_task_type_is_inferred_from_the_model_class(family, head, task_type):
    model = tiny(family, head)
    assert infer_task_type(model) == task_type


@pytest.mark.parametrize(
    "head, task_type, saved",
    [("ForSequenceClassification", "SEQ_CLS", ["classifier"]), ("ForTokenClassification", "TOKEN_CLS", ["classifier"]),
     ("ForQuestionAnswering", "QUESTION_ANS", ["qa_outputs"]), ("Model", "FEATURE_EXTRACTION", None)],
)
def test_the_inferred_task_type_and_its_head_go_into_the_config(head, task_type, saved):
    model = get_peft_model(tiny("bert", head), PolyConfig(n_tasks=2, n_skills=2, r=2))
    config = model.peft_config["default"]
    assert config.task_type == task_type
    if saved is None:
        assert not config.modules_to_save
    else:
        assert all(name in config.modules_to_save for name in saved)
    # an explicit task type wins over the inferred one
    explicit = get_peft_model(tiny("bert", head), PolyConfig(n_tasks=2, n_skills=2, r=2, task_type="FEATURE_EXTRACTION"))
    assert explicit.peft_config["default"].task_type == "FEATURE_EXTRACTION"

"""Which modules of a model get adapters: name matching, per-architecture defaults, task-type inference."""

from __future__ import annotations

import re
from typing import Optional, Union

from torch import nn

#: Default ``target_modules`` per ``config.model_type`` (attention query and value projections, as PEFT).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{
        name: ["q_proj", "v_proj"]
        for name in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
            "phi", "phi3", "opt", "bart", "mbart", "pegasus", "marian", "gpt_neo", "gptj", "olmo", "olmo2",
            "starcoder2", "stablelm", "granite", "cohere", "whisper", "m2m_100", "blenderbot", "smollm3",
        )
    },
    **{name: ["q", "v"] for name in ("t5", "mt5", "umt5", "longt5", "mpnet")},
    **{name: ["query", "value"] for name in ("bert", "roberta", "xlm-roberta", "electra", "camembert", "layoutlm", "ernie", "megatron-bert")},
    **{name: ["c_attn"] for name in ("gpt2", "gpt_bigcode", "imagegpt")},
    **{name: ["query_key_value"] for name in ("bloom", "falcon", "gpt_neox", "chatglm")},
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "albert": ["query", "value"],
    # vision and audio encoders (module names as built by transformers 5); models without Linear attention
    # projections (ConvNeXt, ResNet, ...) have no default
    **{
        name: ["q_proj", "v_proj"]
        for name in (
            "vit", "deit", "beit", "dinov2", "dinov2_with_registers", "dinov3_vit", "vit_msn", "vit_mae", "ijepa", "swin",
            "segformer", "clip", "clip_vision_model", "siglip", "siglip_vision_model", "siglip2_vision_model",
            "wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat", "sew",
            "audio-spectrogram-transformer", "speech_to_text", "moonshine",
        )
    },
    **{name: ["query", "value"] for name in ("swinv2", "yolos", "mobilevit", "data2vec-vision", "pvt", "pvt_v2")},
    **{name: ["linear_q", "linear_v"] for name in ("wav2vec2-conformer", "wav2vec2-bert")},
    "sew-d": ["query_proj", "value_proj"],
    "hiera": ["qkv"],
}

#: Heads that PEFT saves with the adapter for a task type (added to ``modules_to_save``).
TASK_TYPE_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

#: Model classes (by name suffix) classifying an image or a sound: task type ``SEQ_CLS``. PEFT has no task type of
#: their own; ``SEQ_CLS`` is the one whose wrapper (``PeftModelForSequenceClassification``) saves the
#: ``classifier`` head and passes ``task_ids`` and any input (``pixel_values``, ``input_values``, ...) through, so
#: ``peft.PeftModel.from_pretrained`` loads and runs the adapter.
CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForImageClassification", "ForAudioClassification")

#: The ``main_input_name`` of audio models, whose classifiers put a new ``projector`` before the ``classifier``.
AUDIO_INPUTS = ("input_values", "input_features")

Pattern = Optional[Union[list[str], str]]


def matches(name: str, pattern: Pattern) -> bool:
    """Whether module ``name`` is selected by ``pattern``.

    A string pattern is a regular expression that must match the whole dotted name; a list selects names
    equal to an entry or ending with ``"." + entry`` (so ``"q_proj"`` and ``"self_attn.q_proj"`` both select
    ``model.layers.0.self_attn.q_proj``).
    """
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in pattern)


def default_target_modules(model: nn.Module) -> list[str]:
    """The default ``target_modules`` for ``model``'s architecture (``model.config.model_type``).

    Raises:
        ValueError: if the architecture has no default; the message asks for explicit ``target_modules``.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    raise ValueError(
        f"no default target_modules for model_type {model_type!r}: pass PolyConfig(target_modules=[...]) "
        f"(known model types: {', '.join(sorted(DEFAULT_TARGET_MODULES))})"
    )


def default_heads(model: nn.Module, task_type: Optional[str]) -> tuple[str, ...]:
    """Module names trained and saved beside the adapter by default: the task type's head(s), plus the
    ``projector`` of an audio classifier (new in e.g. ``Wav2Vec2ForSequenceClassification`` and
    ``WhisperForAudioClassification``, like the ``classifier`` after it). Names the model lacks are skipped."""
    heads = TASK_TYPE_HEADS.get(task_type, ())
    if task_type == "SEQ_CLS" and getattr(model, "main_input_name", None) in AUDIO_INPUTS:
        heads = ("projector",) + heads
    return heads


def infer_task_type(model: nn.Module) -> str:
    """PEFT's task type for a transformers model, from its class name and config.

    ``*ForCausalLM`` -> ``CAUSAL_LM``; encoder-decoder ``*ForConditionalGeneration`` / ``*ForSeq2SeqLM`` ->
    ``SEQ_2_SEQ_LM``; ``*ForSequenceClassification``, ``*ForImageClassification``, ``*ForAudioClassification``
    -> ``SEQ_CLS`` (see :data:`CLASSIFIER_SUFFIXES`); ``*ForTokenClassification`` -> ``TOKEN_CLS``;
    ``*ForQuestionAnswering`` -> ``QUESTION_ANS``; anything else (a bare encoder) -> ``FEATURE_EXTRACTION``.
    """
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel") and not getattr(config, "is_encoder_decoder", False):
        return "CAUSAL_LM"
    if cls.endswith(CLASSIFIER_SUFFIXES):
        return "SEQ_CLS"
    if cls.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if cls.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    if getattr(config, "is_encoder_decoder", False) and (
        cls.endswith("ForConditionalGeneration") or cls.endswith("Seq2SeqLM") or cls.endswith("LMHeadModel")
    ):
        return "SEQ_2_SEQ_LM"
    if hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)():
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION"

"""Vision and audio models: default target modules, the classifier head trained and saved (task type
``SEQ_CLS``, which PEFT loads and runs), and the task-id length check for every kind of input.

Every model is a tiny one built offline from its transformers config.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import peft
from tests.helpers import randomize_, tiny_llama
from polytropon import PolyConfig, PolyModel, get_peft_model
from polytropon.targets import DEFAULT_TARGET_MODULES

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
IMAGE = dict(SMALL, image_size=32, patch_size=8)
AUDIO = dict(SMALL, conv_dim=(8, 8), conv_stride=(4, 4), conv_kernel=(8, 8), num_conv_pos_embeddings=4,
             num_conv_pos_embedding_groups=2)
WHISPER = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=32,
               vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
TWO_TOWERS = dict(text_config=dict(SMALL), vision_config=IMAGE)

#: (config class, model class, config kwargs) of one model per vision/audio default in DEFAULT_TARGET_MODULES
MODELS = [
    ("ViTConfig", "ViTForImageClassification", IMAGE),
    ("DeiTConfig", "DeiTForImageClassification", IMAGE),
    ("BeitConfig", "BeitForImageClassification", IMAGE),
    ("Dinov2Config", "Dinov2ForImageClassification", IMAGE),
    ("Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification", IMAGE),
    ("DINOv3ViTConfig", "DINOv3ViTModel", IMAGE),
    ("ViTMSNConfig", "ViTMSNForImageClassification", IMAGE),
    ("ViTMAEConfig", "ViTMAEForPreTraining", dict(IMAGE, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                                  decoder_num_attention_heads=2, decoder_intermediate_size=32)),
    ("IJepaConfig", "IJepaForImageClassification", IMAGE),
    ("SwinConfig", "SwinForImageClassification", dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=32,
                                                      patch_size=4, window_size=4)),
    ("Swinv2Config", "Swinv2ForImageClassification", dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=32,
                                                          patch_size=4, window_size=4)),
    ("SegformerConfig", "SegformerForImageClassification", dict(hidden_sizes=[8, 16, 16, 16], num_attention_heads=[1, 2, 2, 2],
                                                                depths=[1, 1, 1, 1], decoder_hidden_size=16)),
    ("CLIPConfig", "CLIPForImageClassification", TWO_TOWERS),
    ("CLIPVisionConfig", "CLIPVisionModel", IMAGE),
    ("SiglipConfig", "SiglipForImageClassification", TWO_TOWERS),
    ("SiglipVisionConfig", "SiglipVisionModel", IMAGE),
    ("Siglip2VisionConfig", "Siglip2VisionModel", SMALL),
    ("YolosConfig", "YolosForObjectDetection", dict(IMAGE, image_size=[32, 32], num_detection_tokens=2)),
    ("MobileViTConfig", "MobileViTForImageClassification", {}),
    ("Data2VecVisionConfig", "Data2VecVisionForImageClassification", IMAGE),
    ("PvtConfig", "PvtForImageClassification", {}),
    ("PvtV2Config", "PvtV2ForImageClassification", {}),
    ("HieraConfig", "HieraForImageClassification", {}),
    ("WhisperConfig", "WhisperForAudioClassification", WHISPER),
    ("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", AUDIO),
    ("HubertConfig", "HubertForSequenceClassification", AUDIO),
    ("WavLMConfig", "WavLMForSequenceClassification", AUDIO),
    ("Data2VecAudioConfig", "Data2VecAudioForSequenceClassification", AUDIO),
    ("UniSpeechConfig", "UniSpeechForSequenceClassification", AUDIO),
    ("UniSpeechSatConfig", "UniSpeechSatForSequenceClassification", AUDIO),
    ("SEWConfig", "SEWForSequenceClassification", dict(AUDIO)),
    ("SEWDConfig", "SEWDForSequenceClassification", AUDIO),
    ("Wav2Vec2ConformerConfig", "Wav2Vec2ConformerForSequenceClassification", AUDIO),
    ("Wav2Vec2BertConfig", "Wav2Vec2BertForSequenceClassification", dict(SMALL, feature_projection_input_dim=16)),
    ("ASTConfig", "ASTForAudioClassification", dict(SMALL, num_mel_bins=16, max_length=32, patch_size=8)),
    ("Speech2TextConfig", "Speech2TextForConditionalGeneration", dict(d_model=32, encoder_layers=1, decoder_layers=1,
                                                                      encoder_attention_heads=4, decoder_attention_heads=4,
                                                                      encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64)),
    ("MoonshineConfig", "MoonshineForConditionalGeneration", dict(hidden_size=32, intermediate_size=64, encoder_num_hidden_layers=1,
                                                                  decoder_num_hidden_layers=1, encoder_num_attention_heads=4,
                                                                  decoder_num_attention_heads=4, vocab_size=64)),
]


def build(config_cls: str, model_cls: str, kwargs: dict, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return getattr(T, model_cls)(getattr(T, config_cls)(**kwargs, **extra)).eval()


@pytest.mark.parametrize("config_cls, model_cls, kwargs", MODELS, ids=[m[1] for m in MODELS])
def test_default_target_modules_adapt_the_attention_projections(config_cls, model_cls, kwargs):
    model = build(config_cls, model_cls, kwargs)
    names = DEFAULT_TARGET_MODULES[model.config.model_type]
    poly = get_peft_model(model, PolyConfig(n_tasks=2, r=2))
    adapted = [path for path, _ in poly.poly_layers()]
    assert adapted and {path.rsplit(".", 1)[-1] for path in adapted} == set(names)
    linear = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n.rsplit(".", 1)[-1] in names]
    assert linear == []  # every module of those names became a Poly layer


#: the vision and audio model types given defaults (whisper had one before, for speech to text)
VISION_AUDIO_TYPES = {
    "vit", "deit", "beit", "dinov2", "dinov2_with_registers", "dinov3_vit", "vit_msn", "vit_mae", "ijepa", "swin", "swinv2",
    "segformer", "clip", "clip_vision_model", "siglip", "siglip_vision_model", "siglip2_vision_model", "yolos", "mobilevit",
    "data2vec-vision", "pvt", "pvt_v2", "hiera", "whisper", "wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech",
    "unispeech-sat", "sew", "sew-d", "wav2vec2-conformer", "wav2vec2-bert", "audio-spectrogram-transformer",
    "speech_to_text", "moonshine",
}


def test_every_vision_and_audio_default_is_tested():
    tested = {getattr(T, config_cls).model_type for config_cls, _, _ in MODELS}
    assert tested == VISION_AUDIO_TYPES
    assert VISION_AUDIO_TYPES <= set(DEFAULT_TARGET_MODULES)


# ----------------------------------------------------------------------------- classifiers: the head trains and is saved
def vit(**extra):
    return build("ViTConfig", "ViTForImageClassification", IMAGE, num_labels=3, **extra)


def wav2vec2(**extra):
    return build("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", AUDIO, num_labels=3, **extra)


def whisper_cls(**extra):
    return build("WhisperConfig", "WhisperForAudioClassification", WHISPER, num_labels=3, **extra)


def images(n: int = 4):
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


def sounds(n: int = 4):
    return {"input_values": torch.randn(n, 400, generator=torch.Generator().manual_seed(0))}


def mel(n: int = 4):
    return {"input_features": torch.randn(n, 8, 32, generator=torch.Generator().manual_seed(0))}


CLASSIFIERS = {  # name: (model builder, inputs, heads trained and saved)
    "vit": (vit, images, ("classifier",)),
    "wav2vec2": (wav2vec2, sounds, ("projector", "classifier")),
    "whisper": (whisper_cls, mel, ("projector", "classifier")),
}


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_head_trains_is_saved_and_reloads(tmp_path, name):
    make, inputs, heads = CLASSIFIERS[name]
    model = get_peft_model(make(), PolyConfig(n_tasks=3, r=2, n_skills=2, init_weights=False))
    config = model.peft_config["default"]
    assert config.task_type == "SEQ_CLS" and set(heads) <= set(config.modules_to_save)
    randomize_(model)
    model.train()
    batch = inputs()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(f"{h}." in n for n in before for h in heads)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(**batch, labels=torch.tensor([0, 1, 2, 0]), task_ids=[0, 1, 2, 1]).loss
    loss.backward()
    optimizer.step()
    for head in heads:  # the head's trainable copy has moved
        moved = [n for n, p in model.named_parameters() if p.requires_grad and f".{head}." in f".{n}" and not torch.equal(p, before[n])]
        assert moved, head
    model.eval()
    with torch.no_grad():
        expected = model(**batch, task_ids=[2, 0, 1, 1]).logits
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    for head in heads:
        assert any(f".{head}." in key for key in saved), head
    reloaded = PolyModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch, task_ids=[2, 0, 1, 1]).logits, expected)
    # PEFT loads the same files (task type SEQ_CLS) and computes the same logits
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    with torch.no_grad():
        got = theirs(**batch, task_ids=torch.tensor([2, 0, 1, 1])).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_bare_vision_encoder_is_feature_extraction():
    model = get_peft_model(build("ViTConfig", "ViTModel", IMAGE), PolyConfig(n_tasks=2))
    assert model.peft_config["default"].task_type == "FEATURE_EXTRACTION"


# ----------------------------------------------------------------------------- task ids: one per example, any input
def embeds(n: int = 4):
    return {"inputs_embeds": torch.randn(n, 5, 32, generator=torch.Generator().manual_seed(0))}


def token_ids(n: int = 4):
    return {"input_ids": torch.randint(3, 90, (n, 5), generator=torch.Generator().manual_seed(0))}


LENGTH_CASES = {  # input kind: (model builder, inputs)
    "pixel_values": (vit, images),
    "input_values": (wav2vec2, sounds),
    "input_features": (whisper_cls, mel),
    "inputs_embeds": (tiny_llama, embeds),
    "input_ids": (tiny_llama, token_ids),
}


@pytest.mark.parametrize("kind", LENGTH_CASES)
def test_task_ids_must_match_the_batch_of_any_input(kind):
    make, inputs = LENGTH_CASES[kind]
    model = get_peft_model(make(), PolyConfig(n_tasks=3, r=2, init_weights=False))
    randomize_(model)
    batch = inputs(4)
    with torch.no_grad():
        for task_ids in ([0, 1], [0, 1, 2], torch.tensor([0, 1, 2, 0, 1])):
            with pytest.raises(ValueError, match=rf"got {len(task_ids)} task_ids for a batch of 4 examples"):
                model(**batch, task_ids=task_ids)
            with model.task_context(task_ids), pytest.raises(ValueError, match="for a batch of 4 examples.*task_context"):
                model(**batch)
        model(**batch, task_ids=[0, 1, 2, 0])
        model(**batch, task_ids=[1])  # one id for the whole batch
        positional = next(iter(batch.values()))
        with pytest.raises(ValueError, match="got 2 task_ids for a batch of 4 examples"):
            model(positional, task_ids=[0, 1])


def test_generate_checks_the_batch_of_audio_features_and_expands_beams():
    """Whisper (speech to text): task ids are checked against ``input_features``; beams keep their example's task."""
    make = lambda: build("WhisperConfig", "WhisperForConditionalGeneration", WHISPER)  # noqa: E731
    model = get_peft_model(make(), PolyConfig(n_tasks=3, r=2, init_weights=False)).eval()
    randomize_(model)
    features = mel(2)["input_features"]
    kwargs = dict(max_new_tokens=3, num_beams=2, do_sample=False)
    with pytest.raises(ValueError, match="got 3 task_ids for a batch of 2 examples"):
        model.generate(input_features=features, task_ids=[0, 1, 2], **kwargs)
    together = model.generate(input_features=features, task_ids=[2, 0], **kwargs)
    for row, task in enumerate([2, 0]):
        alone = model.generate(input_features=features[row:row + 1], task_ids=[task], **kwargs)
        assert torch.equal(together[row, : alone.shape[1]], alone[0])

import json

import pytest

from polytropon import PolyConfig


@pytest.mark.parametrize("field", ["r", "n_tasks", "n_skills", "n_splits"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_sizes_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PolyConfig(**{field: value})


def test_non_int_size_is_a_type_error():
    with pytest.raises(TypeError, match="n_skills"):
        PolyConfig(n_skills=2.5)


def test_unknown_poly_type_is_rejected():
    with pytest.raises(ValueError, match="poly_type.*'mixture'"):
        PolyConfig(poly_type="mixture")


def test_unknown_task_type_is_rejected():
    with pytest.raises(ValueError, match="task_type"):
        PolyConfig(task_type="CAUSAL")


def test_defaults_match_peft():
    import peft

    ours, theirs = PolyConfig(), peft.PolyConfig()
    for name in ("r", "init_weights", "poly_type", "n_tasks", "n_skills", "n_splits", "target_modules", "modules_to_save"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_json_round_trip_and_peft_schema(tmp_path):
    cfg = PolyConfig(r=4, n_tasks=5, n_skills=3, n_splits=2, target_modules=["v", "q"], task_type="SEQ_2_SEQ_LM")
    cfg.save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "POLY"
    assert data["target_modules"] == ["q", "v"]
    back = PolyConfig.from_pretrained(str(tmp_path))
    assert back == PolyConfig(r=4, n_tasks=5, n_skills=3, n_splits=2, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")


def test_config_of_another_method_is_rejected(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match="peft_type.*LORA"):
        PolyConfig.from_pretrained(str(tmp_path))


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json"):
        PolyConfig.from_pretrained(str(tmp_path))

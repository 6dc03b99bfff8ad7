"""Tasks by name, add_tasks, and the unknown-task fallback."""

from __future__ import annotations

import copy

import pytest
import torch

from polytropon import PolyConfig, PolyModel, add_tasks, get_peft_model, set_task_names
from polytropon.variants import unique_routers

NAMES = ["sst2", "qnli", "mnli"]


@pytest.fixture
def _model(randomize_, small_llama):
    """The factory ``_model(...)`` below, built from the shared builders (fixtures)."""

    def _model(make=None, **kw):
        kw.setdefault("n_tasks", 3)
        model = get_peft_model((make or small_llama)(), PolyConfig(**kw))
        randomize_(model)
        return model.eval()

    return _model


@pytest.fixture
def _run(output_tensor, small_inputs):
    """The factory ``_run(...)`` below, built from the shared builders (fixtures)."""

    def _run(model, task_ids, kind="llama"):
        with torch.no_grad():
            return output_tensor(model(**small_inputs(kind), task_ids=task_ids))

    return _run


def _routers(model, adapter="default"):
    return unique_routers([layer.adapters[adapter].poly_router for _, layer in model.poly_layers()])


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}, copy.deepcopy(model.peft_config)


# ---------------------------------------------------------------------- names
def test_task_names_map_to_ids(_model, _run):
    model = _model(task_names=NAMES)
    expected = _run(model, [0, 1, 2, 1])
    torch.testing.assert_close(_run(model, ["sst2", "qnli", "mnli", "qnli"]), expected, atol=0, rtol=0)
    torch.testing.assert_close(_run(model, ["sst2", 1, "mnli", 1]), expected, atol=0, rtol=0)


def test_unknown_name_lists_known_names(_model, _run):
    model = _model(task_names=NAMES)
    with pytest.raises(ValueError, match=r"'cola'.*sst2.*qnli.*mnli"):
        _run(model, ["sst2", "cola", "sst2", "sst2"])
    unnamed = _model()
    with pytest.raises(TypeError, match="'sst2'.*no task_names"):
        _run(unnamed, ["sst2"] * 4)


def test_merge_adapter_accepts_a_name(_model, _run):
    model = _model(task_names=NAMES)
    expected = _run(model, [2] * 4)
    model.merge_adapter("mnli")
    assert model.routing.merged_task == ("default", 2)
    torch.testing.assert_close(_run(model, None), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    with pytest.raises(ValueError, match="unknown task name 'cola'"):
        model.merge_adapter("cola")
    assert model.routing.merged_task is None


def test_task_names_are_saved_and_restored(tmp_path, _model, _run, small_llama):
    model = _model(task_names=NAMES)
    model.save_pretrained(str(tmp_path))
    loaded = PolyModel.from_pretrained(small_llama(), str(tmp_path))
    assert loaded.peft_config["default"].task_names == NAMES
    torch.testing.assert_close(_run(loaded, ["qnli"] * 4), _run(model, [1] * 4), atol=1e-6, rtol=1e-6)


def test_set_task_names_validates(_model, _run):
    model = _model()
    with pytest.raises(ValueError, match="task_names"):
        set_task_names(model, ["a", "b"])
    assert model.peft_config["default"].task_names is None
    set_task_names(model, ["a", "b", "c"])
    torch.testing.assert_close(_run(model, ["c"] * 4), _run(model, [2] * 4), atol=0, rtol=0)


# ---------------------------------------------------------------------- unknown-task fallback
@pytest.fixture
def _uniform_task_output(_run):
    """The factory ``_uniform_task_output(...)`` below, built from the shared builders (fixtures)."""

    def _uniform_task_output(model, task_ids):
        """Outputs with every router row of task 0 set to zero logits (uniform weights = average of skills)."""
        clone = copy.deepcopy(model)
        with torch.no_grad():
            for router in _routers(clone):
                router.module_logits[0] = 0.0
        return _run(clone, task_ids)

    return _uniform_task_output


def test_unknown_task_average_fallback_at_eval(_model, _run, _uniform_task_output):
    model = _model(task_names=NAMES, unknown_task="average", n_splits=2)
    out = _run(model, ["sst2", "cola", 2, 7])  # an unknown name and an id >= n_tasks
    expected_known = _run(model, [0, 0, 2, 2])
    average = _uniform_task_output(model, [0] * 4)
    torch.testing.assert_close(out[[0, 2]], expected_known[[0, 2]], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[[1, 3]], average[[1, 3]], atol=1e-5, rtol=1e-5)
    # a batch made only of unknown tasks, with the no-grad cache
    torch.testing.assert_close(_run(model, ["cola"] * 4), average, atol=1e-5, rtol=1e-5)
    # negative ids stay errors
    with pytest.raises(ValueError, match=">= 0"):
        _run(model, [-2, 0, 0, 0])


def test_unknown_task_fallback_is_eval_only_and_opt_in(_model, _run, small_inputs):
    model = _model(task_names=NAMES, unknown_task="average")
    model.train()
    with pytest.raises(ValueError, match="cola"):
        model(**small_inputs("llama"), task_ids=["cola"] * 4)
    strict = _model(task_names=NAMES)
    with pytest.raises(ValueError, match="out of range"):
        _run(strict, [5, 0, 0, 0])


# ---------------------------------------------------------------------- add_tasks
@pytest.mark.parametrize("granularity", ["module", "block"])
def test_add_tasks_keeps_trained_rows_and_outputs(granularity, _model, _run):
    model = _model(task_names=NAMES, n_splits=2, router_granularity=granularity)
    before = _run(model, [0, 1, 2, 1])
    old_logits = [r.module_logits.detach().clone() for r in _routers(model)]
    new_ids = add_tasks(model, ["cola", "rte"], init="average")
    assert new_ids == [3, 4]
    cfg = model.peft_config["default"]
    assert cfg.n_tasks == 5 and cfg.task_names == NAMES + ["cola", "rte"]
    for old, router in zip(old_logits, _routers(model)):
        assert router.module_logits.shape == (5, old.shape[1])
        assert torch.equal(router.module_logits[:3], old)  # bit-identical
        torch.testing.assert_close(router.module_logits[3], old.mean(0))
        torch.testing.assert_close(router.module_logits[4], old.mean(0))
    assert all(layer.adapters["default"].n_tasks == 5 for _, layer in model.poly_layers())
    torch.testing.assert_close(_run(model, [0, 1, 2, 1]), before, atol=0, rtol=0)
    assert _run(model, ["cola", "rte", "cola", "sst2"]).shape == before.shape
    if granularity == "block":
        assert len(_routers(model)) == 2  # still shared


def test_add_tasks_init_options(_model, _run):
    model = _model(unknown_task="average")
    add_tasks(model, 1, init="uniform")
    add_tasks(model, 1, init=1)
    assert model.peft_config["default"].n_tasks == 5
    for router in _routers(model):
        assert torch.equal(router.module_logits[3], torch.zeros(4))
        assert torch.equal(router.module_logits[4], router.module_logits[1])
    torch.testing.assert_close(_run(model, [4] * 4), _run(model, [1] * 4), atol=0, rtol=0)


def test_add_tasks_copy_of_existing_task_gives_its_outputs(_model, _run):
    model = _model(task_names=NAMES)
    add_tasks(model, ["qnli_copy"], init="qnli")
    torch.testing.assert_close(_run(model, ["qnli_copy"] * 4), _run(model, ["qnli"] * 4), atol=0, rtol=0)


def test_add_tasks_uniform_equals_average_fallback(_model, _run):
    model = _model(unknown_task="average", n_splits=2)
    fallback = _run(model, [3] * 4)
    add_tasks(model, 1, init="uniform")
    torch.testing.assert_close(_run(model, [3] * 4), fallback, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "tasks, init, exc, match",
    [
        (0, "uniform", ValueError, "positive"),
        (True, "uniform", TypeError, "tasks"),
        ("cola", "uniform", TypeError, "tasks"),
        (2, "uniform", ValueError, "names"),  # the adapter names its tasks
        ([], "uniform", ValueError, "at least one"),
        (["sst2"], "uniform", ValueError, "already exists"),
        (["cola", 3], "uniform", TypeError, "names"),
        (["cola", "cola"], "uniform", ValueError, "task_names"),
        (["cola"], "mean", ValueError, "'mean'"),
        (["cola"], 3, ValueError, "out of range"),
        (["cola"], 1.5, TypeError, "init"),
    ],
)
def test_add_tasks_errors_change_nothing(tasks, init, exc, match, _model):
    model = _model(task_names=NAMES)
    tensors, configs = _snapshot(model)
    with pytest.raises(exc, match=match):
        add_tasks(model, tasks, init=init)
    after, after_configs = _snapshot(model)
    assert after_configs == configs
    assert all(torch.equal(after[k], tensors[k]) for k in tensors)


def test_add_tasks_by_name_needs_names(_model):
    model = _model()
    with pytest.raises(ValueError, match="no task_names"):
        add_tasks(model, ["cola"])


def test_add_tasks_to_private_adds_skills(_model, _run):
    model = _model(poly_type="private", n_skills=3, task_names=NAMES, init_weights=False)
    before = _run(model, [0, 1, 2, 0])
    old_a = {p: l.adapters["default"].poly_lora_A.detach().clone() for p, l in model.poly_layers()}
    add_tasks(model, ["cola", "rte"], init="average")
    add_tasks(model, ["qnli2"], init="qnli")
    cfg = model.peft_config["default"]
    assert (cfg.n_tasks, cfg.n_skills) == (6, 6)
    for path, layer in model.poly_layers():
        adapter = layer.adapters["default"]
        assert adapter.poly_lora_A.shape[1] == 6 and adapter.n_skills == 6
        assert torch.equal(adapter.poly_lora_A[:, :3], old_a[path])
        torch.testing.assert_close(adapter.poly_lora_A[:, 3], old_a[path].mean(1))
        assert torch.equal(adapter.poly_lora_A[:, 5], old_a[path][:, 1])
        assert torch.equal(adapter.poly_router.weights[:, 0], torch.eye(6))
    torch.testing.assert_close(_run(model, [0, 1, 2, 0]), before, atol=0, rtol=0)
    torch.testing.assert_close(_run(model, ["qnli2"] * 4), _run(model, ["qnli"] * 4), atol=0, rtol=0)


def test_add_tasks_to_private_uniform_starts_a_fresh_skill(_model, _run, output_tensor, small_inputs):
    model = _model(poly_type="private", n_skills=3)  # init_weights=True: fresh skills start with B = 0
    add_tasks(model, 1, init="uniform")
    with torch.no_grad(), model.disable_adapter():
        base = output_tensor(model(**small_inputs("llama")))
    torch.testing.assert_close(_run(model, [3] * 4), base, atol=1e-6, rtol=1e-6)


def test_add_tasks_to_fixed_grows_the_allocation(tmp_path, _model, _run, small_t5):
    model = _model(make=small_t5, poly_type="fixed", n_tasks=2, n_skills=2, allocation=[[1, 0], [1, 3]])
    before = _run(model, [0, 1, 0, 1], kind="t5")
    add_tasks(model, 2, init="average")
    add_tasks(model, 1, init="uniform")
    assert model.peft_config["default"].allocation == [[1, 0], [1, 3], [0.625, 0.375], [0.625, 0.375], [0.5, 0.5]]
    torch.testing.assert_close(_run(model, [0, 1, 0, 1], kind="t5"), before, atol=0, rtol=0)
    model.save_pretrained(str(tmp_path))
    loaded = PolyModel.from_pretrained(small_t5(), str(tmp_path))
    torch.testing.assert_close(_run(loaded, [2, 3, 4, 1], kind="t5"), _run(model, [2, 3, 4, 1], kind="t5"), atol=1e-6, rtol=1e-6)


def test_add_tasks_then_save_and_load(tmp_path, _model, _run, small_bert_cls):
    model = _model(make=small_bert_cls, task_names=NAMES)
    add_tasks(model, ["cola"], init="sst2")
    with torch.no_grad():
        for router in _routers(model):
            router.module_logits[3] += 0.5
    model.save_pretrained(str(tmp_path))
    loaded = PolyModel.from_pretrained(small_bert_cls(), str(tmp_path))
    assert loaded.peft_config["default"].n_tasks == 4
    torch.testing.assert_close(
        _run(loaded, ["cola", "sst2", "mnli", "cola"], kind="bert"),
        _run(model, ["cola", "sst2", "mnli", "cola"], kind="bert"), atol=1e-6, rtol=1e-6,
    )


def test_add_tasks_keeps_trainability_and_device(_model):
    model = _model()
    add_tasks(model, 2)
    for router in _routers(model):
        assert router.module_logits.requires_grad
    assert model.get_nb_trainable_parameters()[0] == sum(
        p.numel() for n, p in model.named_parameters() if "poly_" in n
    )


def test_model_methods_delegate_to_the_toolkit(_model):
    model = _model(task_names=NAMES)
    assert model.add_tasks(["cola"], init="qnli") == [3]
    cola, qnli = model.routing_weights("cola"), model.routing_weights(1)
    assert set(cola) == set(qnli) == {path for path, _ in model.poly_layers()}
    for path in cola:
        assert torch.equal(cola[path], qnli[path])
    assert model.freeze_skills() == sum(r.module_logits.numel() for r in _routers(model))

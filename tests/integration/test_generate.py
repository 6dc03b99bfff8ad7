"""generate routes every example to its task under every decoding strategy (PEFT crashes on expanded batches)."""

import pytest
import torch
from tests.helpers import MODELS

from polytropon import PolyConfig, get_peft_model

TASKS = [2, 0, 1]
STRATEGIES = {
    "greedy": dict(do_sample=False),
    "beam": dict(do_sample=False, num_beams=3),
    "beam_multi": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "sample_multi": dict(do_sample=True, num_return_sequences=3, top_k=0),
}


@pytest.fixture
def build(randomize_):
    """The factory ``build(...)`` below, built from the shared builders (fixtures)."""

    def build(kind):
        model = get_peft_model(MODELS[kind](), PolyConfig(n_tasks=3, n_splits=2, init_weights=False))
        randomize_(model, seed=5)
        return model.eval()

    return build


def generate(model, inputs, task_ids, strategy):
    torch.manual_seed(0)
    return model.generate(
        **inputs, task_ids=task_ids, max_new_tokens=6, pad_token_id=0, output_scores=True,
        return_dict_in_generate=True, **STRATEGIES[strategy],
    )


@pytest.mark.parametrize("strategy", ["greedy", "beam", "beam_multi", "sample_multi"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_batch_equals_each_example_alone(kind, strategy, build, batch_inputs):
    model = build(kind)
    inputs = batch_inputs(kind, batch=3, length=6)
    inputs.pop("decoder_input_ids", None)
    together = generate(model, inputs, TASKS, strategy)
    per_example = STRATEGIES[strategy].get("num_return_sequences", 1)
    assert together.sequences.shape[0] == 3 * per_example
    for i, task in enumerate(TASKS):
        alone_inputs = {k: v[i : i + 1] for k, v in inputs.items()}
        if strategy == "sample_multi":
            # sampling draws different random numbers alone; compare the first step's distribution instead
            with torch.no_grad():
                alone = model(**alone_inputs, **({"decoder_input_ids": torch.zeros(1, 1, dtype=torch.long)} if kind == "t5" else {}), task_ids=[task]).logits[:, -1]
            rows = together.scores[0][i * per_example : (i + 1) * per_example]
            for row in rows:
                finite = torch.isfinite(row)
                torch.testing.assert_close(row[finite], alone[0][finite], rtol=1e-4, atol=1e-4)
            continue
        alone = generate(model, alone_inputs, [task], strategy)
        rows = together.sequences[i * per_example : (i + 1) * per_example]
        width = alone.sequences.shape[1]  # the batch may run longer for other examples: padding after EOS
        assert torch.equal(rows[:, :width], alone.sequences), (i, task)
        assert torch.all(rows[:, width:] == 0)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_task_ids_change_beam_search_output(kind, build, batch_inputs):
    model = build(kind)
    inputs = batch_inputs(kind, batch=1, length=6)
    inputs.pop("decoder_input_ids", None)
    scores = [torch.stack(generate(model, inputs, [t], "beam").scores) for t in range(3)]
    assert not torch.allclose(scores[0], scores[1], atol=1e-4)


def test_generate_without_task_ids_is_rejected_before_running(build, batch_inputs):
    model = build("llama")
    with pytest.raises(ValueError, match="task_ids are required"):
        model.generate(**batch_inputs("llama", batch=2), max_new_tokens=2)


def test_task_ids_length_must_fit_the_batch_in_generate(build, batch_inputs):
    model = build("llama")
    with pytest.raises(ValueError, match="2 task_ids for a batch of 3"):
        model.generate(**batch_inputs("llama", batch=3), task_ids=[0, 1], max_new_tokens=2)

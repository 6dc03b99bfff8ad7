"""Memory stays bounded: thousands of calls with changing task sets keep no growing state.

The eval mixture cache (:meth:`polytropon.layer.PolyAdapter._eval_factors`) holds one entry per adapter and
layer (the mixtures of the last task set); routing state lives for one call. Counted here: every live tensor
(``gc``) and the bytes they hold, after a warm-up and after the run, must not grow.
"""

from __future__ import annotations

import gc
import random

import torch
from torch import nn

from polytropon import PolyConfig, get_peft_model


def live_tensors() -> tuple[int, int]:
    """``(number, bytes)`` of the plain tensors and parameters alive now (distinct storages counted once).

    Tensor subclasses (e.g. the fake tensors torch.compile leaves behind in the process) hold no memory.
    """
    gc.collect()
    count, storages = 0, {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, nn.Parameter):  # type(), not isinstance: no __class__ lookups on odd objects
            count += 1
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return count, sum(storages.values())


class MLP(nn.Module):
    def __init__(self, d: int = 16, layers: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _run(model, calls: int, n_tasks: int, rng: random.Random, make_input, mode: str) -> None:
    for _ in range(calls):
        batch = rng.randint(1, 8)
        k = rng.randint(1, min(batch, n_tasks))
        tasks = rng.sample(range(n_tasks), k)  # a new task set almost every call
        ids = [rng.choice(tasks) for _ in range(batch)]
        x = make_input(batch, rng.randint(1, 12))
        if mode == "no_grad":
            with torch.no_grad():
                model(x, task_ids=ids)
        elif mode == "inference":
            with torch.inference_mode():
                model(x, task_ids=torch.tensor(ids))
        else:  # "train": a forward and backward per call
            model(x, task_ids=ids).sum().backward()


def test_eval_cache_and_routing_state_stay_bounded_over_thousands_of_calls():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), PolyConfig(r=4, n_tasks=40, n_skills=4, n_splits=2, init_weights=False,
                                             target_modules=["layers.0", "layers.1", "layers.2", "layers.3"]))
    model.add_adapter("other", PolyConfig(r=2, n_tasks=40, n_skills=2, target_modules=["layers.1"],
                                          router_granularity="model"))
    rng = random.Random(0)
    make = lambda b, t: torch.randn(b, t, 16)  # noqa: E731

    def cycle(calls: int) -> None:  # every adapter, every mode that can keep something
        for adapter in ("default", "other", "default"):
            model.set_adapter(adapter)
            model.eval()
            _run(model, calls, 40, rng, make, "no_grad")
            _run(model, calls * 3 // 10, 40, rng, make, "inference")
            model.train()
            _run(model, calls // 10, 40, rng, make, "train")
        # the same last calls every time, so that the measured state is the same kind of state
        fixed = torch.ones(4, 3, 16)
        for adapter in ("other", "default"):
            model.set_adapter(adapter)
            model.train()
            model(fixed, task_ids=[0, 1, 1, 2]).sum().backward()
            model.eval()
            with torch.no_grad():
                model(fixed, task_ids=[3, 3, 4, 5])
            with torch.inference_mode():
                model(fixed, task_ids=[6, 7, 6, 7])

    cycle(20)  # warm-up: fills the caches and creates the gradients (which are not a leak)
    before = live_tensors()
    cycle(1000)
    after = live_tensors()
    assert after[0] <= before[0], (before, after)
    assert after[1] <= before[1], (before, after)
    # one cached mixture per adapter and layer at most
    for module in model.modules():
        cache = getattr(module, "_cache", None)
        assert cache is None or isinstance(cache, tuple)


def test_generation_keeps_nothing_between_calls():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2)).eval()
    model = get_peft_model(base, PolyConfig(r=2, n_tasks=30, n_skills=3, n_splits=2, init_weights=False)).eval()
    rng = random.Random(1)

    def generate(calls: int) -> None:
        for _ in range(calls):
            batch = rng.randint(1, 4)
            ids = [rng.randrange(30) for _ in range(batch)]
            prompt = torch.randint(3, 64, (batch, rng.randint(1, 6)))
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), task_ids=ids, max_new_tokens=3,
                           do_sample=False, num_beams=rng.choice((1, 2)), pad_token_id=0)

    fixed = dict(input_ids=torch.full((2, 3), 5), max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    generate(10)
    model.generate(**fixed, task_ids=[1, 2])
    before = live_tensors()
    generate(120)
    model.generate(**fixed, task_ids=[1, 2])
    after = live_tensors()
    assert after[0] <= before[0] and after[1] <= before[1], (before, after)

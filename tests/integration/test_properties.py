"""Property tests: random valid configurations against a naive per-example reference of the method's formula.

For an adapted layer ``W`` and an example of task ``t`` (README, "The method")::

    p[q, s] = sigmoid(Z[t, q, s])                          eval
            = sigmoid((log u - log(1 - u) + Z[t, q, s]) / T)  training: relaxed Bernoulli, u ~ U(0, 1)
    w[q, s] = p[q, s] / (sum_s p[q, s] + 1e-12)
    A_t = concat_q sum_s w[q, s] A[q, s],  B_t = concat_q sum_s w[q, s] B[q, s]
    y   = W x + x A_t B_t / r

Fixed allocations (``private`` / ``shared`` / ``fixed``) use ``w[q, :] = alloc[t] / sum(alloc[t])`` in every
split; hard routing uses ``1[p >= 0.5]`` (at least the arg-max skill) averaged, with the soft weights'
gradient. The reference runs the untouched base model one example at a time, with forward hooks on the
adapted modules adding ``x A_t B_t / r`` computed by the loops above, from leaf copies of the adapter's
tensors, so its gradients come from plain autograd through the formula.

Training noise: the reference draws, after the same ``torch.manual_seed``, one ``torch.rand(batch, q, s)``
per learned router in the library's order -- first every router used by a single layer with soft routing
(in the order of the layers), then the others (routers shared by several layers, hard routing) in the order
the forward pass first uses them.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from polytropon import PolyConfig, PolyLayer, get_peft_model

TOL = dict(rtol=1e-5, atol=1e-5)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], derandomize=True)
EPS = 1e-12


# --------------------------------------------------------------------------- tiny models
def _conv1d(n_out: int, n_in: int) -> Conv1D:
    layer = Conv1D(n_out, n_in)
    with torch.no_grad():  # transformers initialises the bias to zero: make the base layer non-trivial
        layer.weight.normal_(0.0, 0.3)
        layer.bias.normal_(0.0, 0.3)
    return layer


class Block(nn.Module):
    def __init__(self, d: int, h: int, conv_up: bool, conv_down: bool, bias: bool) -> None:
        super().__init__()
        self.up = _conv1d(h, d) if conv_up else nn.Linear(d, h, bias=bias)
        self.down = _conv1d(d, h) if conv_down else nn.Linear(h, d, bias=bias)
        self.norm = nn.LayerNorm(d)  # not adaptable: a target naming it is a TypeError

    def forward(self, x):
        return self.norm(x + self.down(torch.tanh(self.up(x))))


class Net(nn.Module):
    """``inp``, ``layers.<i>.up`` / ``layers.<i>.down`` per block, ``out`` (``inp``, ``out``: outside any block)."""

    def __init__(self, d: int, h: int, kinds: list[tuple[bool, bool]], bias: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d, bias=bias)
        self.layers = nn.ModuleList(Block(d, h, up, down, bias) for up, down in kinds)
        self.out = nn.Linear(d, d, bias=bias)

    def forward(self, x):
        x = self.inp(x)
        for block in self.layers:
            x = block(x)
        return self.out(x)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=40, n_embd=12, n_layer=2, n_head=2, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


# --------------------------------------------------------------------------- strategies
WIDTHS = (6, 12, 18)  # every model width is a multiple of 6 ...
SPLITS = (1, 2, 3, 6)  # ... so every n_splits here divides every width


@st.composite
def poly_configs(draw, names: tuple[str, ...]):
    """A valid PolyConfig over target names ``names`` (every variant, granularity and routing option)."""
    targets = [name for name in names if draw(st.booleans())] or [draw(st.sampled_from(names))]
    poly_type = draw(st.sampled_from(("poly", "poly", "poly", "private", "shared", "fixed")))
    n_tasks = draw(st.integers(1, 5))
    n_skills = {"private": n_tasks, "shared": 1}.get(poly_type) or draw(st.integers(1, 4))
    kwargs = dict(
        r=draw(st.integers(1, 4)), n_tasks=n_tasks, n_skills=n_skills, n_splits=draw(st.sampled_from(SPLITS)),
        poly_type=poly_type, target_modules=targets, init_weights=draw(st.booleans()),
        router_granularity=draw(st.sampled_from(("module", "block", "block", "model"))),
    )
    if poly_type == "poly":
        kwargs["router_temperature"] = draw(st.sampled_from((1.0, 1.0, 0.5, 2.0)))
        kwargs["hard_routing"] = draw(st.sampled_from((False, False, False, True)))
    if poly_type == "fixed":
        rows = st.lists(st.sampled_from((0.0, 0.5, 1.0, 2.0)), min_size=n_skills, max_size=n_skills).filter(lambda r: sum(r) > 0)
        kwargs["allocation"] = draw(st.lists(rows, min_size=n_tasks, max_size=n_tasks))
    return PolyConfig(**kwargs)


@st.composite
def nets(draw):
    d, h = draw(st.sampled_from(WIDTHS)), draw(st.sampled_from(WIDTHS))
    kinds = draw(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=2))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    return Net(d, h, kinds, bias=draw(st.booleans()))


# --------------------------------------------------------------------------- the naive reference
def adapted_paths(model, adapter: str) -> list[str]:
    """Paths of the layers carrying ``adapter``, in the model's module order (= forward order here)."""
    return [n for n, m in model.model.named_modules() if isinstance(m, PolyLayer) and adapter in m.adapters]


def group_of(path: str, granularity: str) -> str:
    if granularity == "module":
        return path
    if granularity == "model":
        return "<model>"
    parts = path.split(".")
    for i, part in enumerate(parts):
        if re.fullmatch(r"\d+", part):
            return ".".join(parts[: i + 1])
    return path


class Reference:
    """Leaf copies of one adapter's tensors and the formula, applied per example through hooks on a base copy."""

    def __init__(self, model, base_copy: nn.Module, adapter: str) -> None:
        self.cfg = cfg = model.peft_config[adapter]
        self.base = base_copy
        self.paths = adapted_paths(model, adapter)
        self.groups = {p: group_of(p, cfg.router_granularity) for p in self.paths}
        self.A, self.B, self.Z = {}, {}, {}
        for path in self.paths:
            mod = model.model.get_submodule(path).adapters[adapter]
            self.A[path] = mod.poly_lora_A.detach().clone().requires_grad_(True)
            self.B[path] = mod.poly_lora_B.detach().clone().requires_grad_(True)
            if cfg.poly_type == "poly" and self.groups[path] not in self.Z:
                self.Z[self.groups[path]] = mod.poly_router.module_logits.detach().clone().requires_grad_(True)
        if cfg.poly_type == "private":
            self.alloc = torch.eye(cfg.n_tasks)
        elif cfg.poly_type == "shared":
            self.alloc = torch.ones(cfg.n_tasks, 1)
        elif cfg.poly_type == "fixed":
            self.alloc = torch.tensor(cfg.allocation)

    def draw_noise(self, batch: int) -> dict[str, torch.Tensor]:
        """``u`` per learned router, drawn in the library's order (see the module docstring)."""
        cfg = self.cfg
        if cfg.poly_type != "poly":
            return {}
        sizes: dict[str, int] = {}
        for path in self.paths:
            sizes[self.groups[path]] = sizes.get(self.groups[path], 0) + 1
        first_use = list(dict.fromkeys(self.groups[p] for p in self.paths))
        early = [g for g in first_use if sizes[g] == 1 and not cfg.hard_routing]
        order = early + [g for g in first_use if g not in early]
        return {g: torch.rand(batch, cfg.n_splits, cfg.n_skills) for g in order}

    def weights(self, path: str, task: int, noise: dict, row: int) -> torch.Tensor:
        """Routing weights ``w (q, s)`` of one example (eval when ``noise`` is empty)."""
        cfg = self.cfg
        q, s = cfg.n_splits, cfg.n_skills
        if cfg.poly_type != "poly":
            a = self.alloc[task]
            return (a / a.sum()).expand(q, s)
        z = self.Z[self.groups[path]][task].view(q, s)
        if noise:
            eps = torch.finfo(torch.float32).eps
            u = noise[self.groups[path]][row].clamp(eps, 1 - eps)
            p = torch.sigmoid((torch.log(u) - torch.log(1 - u) + z) / cfg.router_temperature)
        else:
            p = torch.sigmoid(z)
        soft = p / (p.sum(-1, keepdim=True) + EPS)
        if not cfg.hard_routing:
            return soft
        with torch.no_grad():
            h = (p >= 0.5).float()
            for split in range(q):
                if h[split].sum() == 0:
                    h[split, int(p[split].argmax())] = 1.0
            hard = h / h.sum(-1, keepdim=True)
        return hard + (soft - soft.detach())

    def update(self, path: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x A_t B_t / r`` with ``A_t, B_t`` mixed by plain sums over skills, concatenated over splits."""
        A, B = self.A[path], self.B[path]
        q, s = w.shape
        a_t = torch.cat([sum(w[j, k] * A[j, k] for k in range(s)) for j in range(q)], dim=0)
        b_t = torch.cat([sum(w[j, k] * B[j, k] for k in range(s)) for j in range(q)], dim=1)
        return x @ a_t @ b_t / self.cfg.r

    def run(self, inputs: torch.Tensor, task_ids: list[int], noise: dict, call) -> list[torch.Tensor]:
        """Per-example outputs: ``call(base, inputs[i:i+1])`` with example ``i`` routed to ``task_ids[i]``."""
        outs = []
        for i, task in enumerate(task_ids):
            handles = []
            for path in self.paths:
                w = self.weights(path, task, noise, i)
                hook = lambda mod, args, out, path=path, w=w: out + self.update(path, args[0], w)  # noqa: E731
                handles.append(self.base.get_submodule(path).register_forward_hook(hook))
            try:
                outs.append(call(self.base, inputs[i : i + 1]))
            finally:
                for handle in handles:
                    handle.remove()
        return outs

    def grads(self) -> dict[str, torch.Tensor]:
        out = {}
        for path in self.paths:
            out[f"{path}.A"], out[f"{path}.B"] = self.A[path].grad, self.B[path].grad
            if self.cfg.poly_type == "poly":
                out[f"{path}.Z"] = self.Z[self.groups[path]].grad
        return out


def library_grads(model, adapter: str) -> dict[str, torch.Tensor]:
    out = {}
    for path in adapted_paths(model, adapter):
        mod = model.model.get_submodule(path).adapters[adapter]
        out[f"{path}.A"], out[f"{path}.B"] = mod.poly_lora_A.grad, mod.poly_lora_B.grad
        if model.peft_config[adapter].poly_type == "poly":
            out[f"{path}.Z"] = mod.poly_router.module_logits.grad
    return out


def randomize_adapters(model, seed: int) -> None:
    """Random non-zero skills (B too: it starts at zero) and router logits for every adapter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "poly_lora" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.4)
            elif "module_logits" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 1.5)


def build(base: nn.Module, configs: list[PolyConfig], active: int, seed: int):
    """Wrap ``base`` (a copy is kept untouched for the reference) with adapters a0, a1, ... and activate one."""
    base_copy = copy.deepcopy(base).eval()
    for p in base_copy.parameters():
        p.requires_grad_(False)
    model = get_peft_model(base, configs[0], adapter_name="a0")
    for i, cfg in enumerate(configs[1:], start=1):
        model.add_adapter(f"a{i}", cfg)
    randomize_adapters(model, seed)
    model.set_adapter(f"a{active}")
    return model, base_copy


def task_batch(draw, n_tasks: int, batch: int, allow_single: bool) -> list[int]:
    """Task ids with repeats: one per example, or (eval only) one id for the whole batch."""
    if allow_single and draw(st.integers(0, 4)) == 0:
        return [draw(st.integers(0, n_tasks - 1))]
    return draw(st.lists(st.integers(0, n_tasks - 1), min_size=batch, max_size=batch))


def check_model(data, model, base_copy, inputs, call, loss_of):
    """Eval outputs of every adapter and a training step's gradients of the active one, against the reference."""
    batch = inputs.shape[0]
    names = list(model.peft_config)
    active = model.active_adapter
    model.eval()
    for name in names:  # switching adapters: each one computes its own formula
        model.set_adapter(name)
        ref = Reference(model, base_copy, name)
        ids = task_batch(data.draw, ref.cfg.n_tasks, batch, allow_single=True)
        per_example = ids * batch if len(ids) == 1 else ids
        with torch.no_grad():
            expected = torch.cat(ref.run(inputs, per_example, {}, call))
        as_tensor = data.draw(st.booleans())
        task_ids = torch.tensor(ids) if as_tensor else ids
        with torch.no_grad():
            got = call(model, inputs, task_ids)
            again = call(model, inputs, task_ids)  # the cached mixtures
        torch.testing.assert_close(got, expected, **TOL)
        torch.testing.assert_close(again, expected, **TOL)
        got_autograd = call(model, inputs, task_ids)  # eval mode, autograd on
        torch.testing.assert_close(got_autograd.detach(), expected, **TOL)
        with torch.inference_mode():
            torch.testing.assert_close(call(model, inputs, task_ids), expected, **TOL)
    model.set_adapter(active)

    # a training step: same routing noise, gradients through the formula
    model.train()
    ref = Reference(model, base_copy, active)
    cfg, sizes = ref.cfg, list(ref.groups.values())
    shared = any(sizes.count(g) > 1 for g in sizes) and cfg.poly_type == "poly"
    event(f"train {cfg.poly_type} hard={cfg.hard_routing} granularity={cfg.router_granularity} shared={shared}")
    event(f"{len(names)} adapter(s), {len(ref.paths)} adapted layers")
    ids = task_batch(data.draw, ref.cfg.n_tasks, batch, allow_single=False)
    seed = data.draw(st.integers(0, 2**16))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = call(model, inputs, torch.tensor(ids))
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    loss_of(out, weight).backward()
    torch.manual_seed(seed)
    noise = ref.draw_noise(batch)
    ref_out = torch.cat(ref.run(inputs, ids, noise, call))
    loss_of(ref_out, weight).backward()
    torch.testing.assert_close(out.detach(), ref_out.detach(), **TOL)
    got, expected = library_grads(model, active), ref.grads()
    assert got.keys() == expected.keys()
    for key in expected:
        if expected[key] is None:  # a fixed allocation or a router row no example used still has a zero grad
            continue
        scale = max(1.0, float(expected[key].abs().max()))
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{key}: {m}")
    for name in names:  # only the active adapter trains
        if name != active:
            assert all(g is None for g in library_grads(model, name).values())


def _call_net(model, x, task_ids=None):
    return model(x) if task_ids is None else model(x, task_ids=task_ids)


def _loss(out, weight):
    return (out * weight).sum()


@settings(max_examples=80, **SETTINGS)
@given(data=st.data(), net=nets())
def test_random_configurations_match_the_formula(data, net):
    names = ("inp", "up", "down", "out")
    configs = data.draw(st.lists(poly_configs(names), min_size=1, max_size=3))
    active = data.draw(st.integers(0, len(configs) - 1))
    model, base_copy = build(net, configs, active, seed=data.draw(st.integers(0, 2**16)))
    d = net.inp.in_features
    batch = data.draw(st.integers(1, 5))
    shape = (batch, d) if data.draw(st.integers(0, 5)) == 0 else (batch, data.draw(st.integers(1, 11)), d)
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(batch))
    check_model(data, model, base_copy, inputs, _call_net, _loss)


@settings(max_examples=8, **SETTINGS)
@given(data=st.data(), granularity=st.sampled_from(("block", "model")), temperature=st.sampled_from((1.0, 0.5)))
def test_shared_and_own_routers_in_one_model(data, granularity, temperature):
    """Routers of one layer (``inp``, ``out``) and shared ones (each block's, or the model's) side by side."""
    torch.manual_seed(0)
    net = Net(12, 6, [(False, True), (True, False)], bias=True)
    targets = ["inp", "up", "down", "out"] if granularity == "block" else ["up", "down"]
    cfg = PolyConfig(r=2, n_tasks=3, n_skills=3, n_splits=2, target_modules=targets,
                     router_granularity=granularity, router_temperature=temperature)
    model, base_copy = build(net, [cfg], 0, seed=data.draw(st.integers(0, 100)))
    inputs = torch.randn(4, 5, 12)
    check_model(data, model, base_copy, inputs, _call_net, _loss)


def _call_gpt2(model, input_ids, task_ids=None):
    kwargs = {} if task_ids is None else {"task_ids": task_ids}
    return model(input_ids=input_ids, **kwargs).logits


@settings(max_examples=6, **SETTINGS)
@given(data=st.data())
def test_random_configurations_on_gpt2_match_the_formula(data):
    torch.manual_seed(data.draw(st.integers(0, 100)))
    base = tiny_gpt2()  # Conv1D attention and MLP projections, 12 wide (every n_splits in SPLITS divides it)
    configs = data.draw(st.lists(poly_configs(("c_attn", "c_proj", "c_fc")), min_size=1, max_size=2))
    model, base_copy = build(base, configs, data.draw(st.integers(0, len(configs) - 1)), seed=1)
    batch = data.draw(st.integers(1, 3))
    inputs = torch.randint(0, 40, (batch, data.draw(st.integers(1, 10))), generator=torch.Generator().manual_seed(batch))
    check_model(data, model, base_copy, inputs, _call_gpt2, lambda out, w: (out * w).sum() / out.shape[-1])


# --------------------------------------------------------------------------- invalid inputs
def snapshot(model) -> dict:
    """Everything a failed call must leave as it was."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "adapters": {k: v.to_dict() for k, v in model.peft_config.items()},
        "active": model.active_adapter,
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
        "grads": [n for n, p in model.named_parameters() if p.grad is not None],
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    for key in ("modules", "adapters", "active", "trainable", "grads"):
        assert before[key] == after[key], key
    assert torch.equal(before["rng"], after["rng"])  # nothing ran: not even a routing sample was drawn


@st.composite
def bad_task_ids(draw, n_tasks: int, batch: int):
    """``(task_ids, expected exception)`` for task ids that must be refused."""
    kind = draw(st.sampled_from(("float", "bool", "list_float", "list_bool", "low", "high", "2d", "0d", "empty", "length", "type", "name")))
    ok = draw(st.lists(st.integers(0, n_tasks - 1), min_size=batch, max_size=batch))
    if kind == "float":
        return torch.tensor(ok, dtype=draw(st.sampled_from((torch.float32, torch.float64, torch.float16)))), TypeError
    if kind == "bool":
        return torch.tensor(ok) > 0, TypeError
    if kind == "list_float":
        return ok[:-1] + [float(ok[-1])], TypeError
    if kind == "list_bool":
        return ok[:-1] + [True], TypeError
    if kind in ("low", "high"):
        bad = draw(st.integers(-1000, -1)) if kind == "low" else draw(st.integers(n_tasks, n_tasks + 1000))
        ids = list(ok)
        ids[draw(st.integers(0, batch - 1))] = bad
        return (torch.tensor(ids) if draw(st.booleans()) else ids), ValueError
    if kind == "2d":
        return torch.tensor(ok).view(batch, 1) if draw(st.booleans()) else torch.tensor(ok).view(1, batch), ValueError
    if kind == "0d":
        return torch.tensor(ok[0]), ValueError
    if kind == "empty":
        return (torch.zeros(0, dtype=torch.long) if draw(st.booleans()) else []), ValueError
    if kind == "length":  # neither one id per example nor a single id (nor, today, a divisor of the batch)
        length = draw(st.integers(2, 2 * batch + 3).filter(lambda n: batch % n != 0))
        return draw(st.lists(st.integers(0, n_tasks - 1), min_size=length, max_size=length)), ValueError
    if kind == "type":
        return draw(st.sampled_from((3.0, "0", {0: 1}, {0}))), TypeError
    return ["no-such-task"] * batch, TypeError  # a task name while the adapter has no task names


def _bad_config(draw) -> tuple[object, type]:
    """``(config, expected exception)`` for an add_adapter that must be refused without touching the model."""
    kind = draw(st.sampled_from(("splits", "nothing", "norm", "not_config")))
    if kind == "splits":  # widths are multiples of 6: 4 divides some, 5 and 7 none
        return PolyConfig(n_splits=draw(st.sampled_from((5, 7))), target_modules=["inp", "up"]), ValueError
    if kind == "nothing":
        return PolyConfig(target_modules=draw(st.sampled_from((["nope"], r"layers\.9\..*"))), n_tasks=2), ValueError
    if kind == "norm":
        return PolyConfig(target_modules=["up", "norm"], n_tasks=2), TypeError
    return {"r": 4, "target_modules": ["up"]}, TypeError


INVALID_CONFIG_FIELDS = [
    (dict(r=0), ValueError), (dict(r=2.0), TypeError), (dict(n_tasks=-1), ValueError), (dict(n_skills=True), TypeError),
    (dict(poly_type="mixed"), ValueError), (dict(poly_type="private", n_tasks=3, n_skills=2), ValueError),
    (dict(poly_type="shared", n_skills=2), ValueError), (dict(poly_type="fixed"), ValueError),
    (dict(poly_type="fixed", n_tasks=2, n_skills=2, allocation=[[1.0, 0.0]]), ValueError),
    (dict(poly_type="fixed", n_tasks=1, n_skills=2, allocation=[[-1.0, 2.0]]), ValueError),
    (dict(poly_type="fixed", n_tasks=1, n_skills=2, allocation=[[0.0, 0.0]]), ValueError),
    (dict(allocation=[[1.0]], n_tasks=1, n_skills=1), ValueError), (dict(router_granularity="layer"), ValueError),
    (dict(router_temperature=0.0), ValueError), (dict(router_temperature="1"), TypeError),
    (dict(poly_type="shared", n_skills=1, hard_routing=True), ValueError), (dict(task_names=["a"], n_tasks=2), ValueError),
    (dict(task_names=["a", "a"], n_tasks=2), ValueError), (dict(target_modules=[1]), TypeError),
]


@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), net=nets())
def test_invalid_inputs_raise_and_leave_the_model_unchanged(data, net):
    configs = data.draw(st.lists(poly_configs(("inp", "up", "down", "out")), min_size=1, max_size=2))
    model, _ = build(net, configs, data.draw(st.integers(0, len(configs) - 1)), seed=3)
    model.train(data.draw(st.booleans()))
    batch = data.draw(st.integers(1, 4))
    x = torch.randn(batch, 3, net.inp.in_features)
    n_tasks = model.peft_config[model.active_adapter].n_tasks
    action = data.draw(st.sampled_from(("task_ids", "task_ids", "task_ids", "generate_none", "config", "fields", "adapter")))
    before = snapshot(model)
    if action == "task_ids":
        task_ids, exc = data.draw(bad_task_ids(n_tasks, batch))
        with pytest.raises(exc):
            model(x, task_ids=task_ids)
    elif action == "generate_none":  # an active adapter needs task ids
        with pytest.raises(ValueError, match="task_ids are required"):
            model(x)
    elif action == "config":
        config, exc = _bad_config(data.draw)
        with pytest.raises(exc):
            model.add_adapter("new", config)
    elif action == "fields":
        fields, exc = data.draw(st.sampled_from(INVALID_CONFIG_FIELDS))
        with pytest.raises(exc):
            model.add_adapter("new", PolyConfig(**{"target_modules": ["up"], **fields}))
    else:
        name, exc = data.draw(st.sampled_from((("a0", ValueError), ("", ValueError), (None, ValueError))))
        if data.draw(st.booleans()):
            with pytest.raises(exc):
                model.add_adapter(name, PolyConfig(target_modules=["up"]))
        else:
            with pytest.raises(ValueError, match="unknown adapter"):
                model.set_adapter(data.draw(st.sampled_from(("missing", "A0", ""))))
    assert_unchanged(before, snapshot(model))
    # and the model still works with good task ids
    model.eval()
    with torch.no_grad():
        out = model(x, task_ids=[0] * batch)
    assert torch.isfinite(out).all()

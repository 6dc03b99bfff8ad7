"""Recompute a layer input in backward from tensors the base model's own backward already keeps.

A LoRA-style update needs its layer input ``x`` for ``dA = x^T dh``, and a frozen base linear does not keep it:
saving ``x`` is most of the memory an adapter adds to a training step. But ``x`` is often the result of an
elementwise product whose operands autograd keeps anyway for the base's backward: a Llama-style RMSNorm
output ``weight * (h * rsqrt(mean(h^2) + eps))`` (the ``h`` and the ``rsqrt`` are saved by the inner product),
or an MLP's gated activation ``silu(g) * u`` (both factors saved by the product). Walking ``x``'s autograd
graph, :func:`plan_replay` finds such a recipe and the kept tensors it needs; :meth:`Replay.run` recomputes
``x`` from them in backward. Saving references to tensors that are kept anyway costs no memory.

Exact: only correctly rounded elementwise operations are replayed (a float product ``a * b`` and a cast
``t.to(dtype)``), so the recomputed ``x`` has the same bits as the original, on any kernel or vectorisation.
Nodes replayed (autograd's names)::

    MulBackward0     a * b  (tensor by tensor; an operand autograd did not save is replayed from its own node)
    ToCopyBackward0  t.to(dtype), same device
    AccumulateGrad   a leaf tensor that requires grad (the tensor itself)

Anything else (a view, a tensor with no graph, another operation, saved-tensor hooks in effect such as
activation checkpointing or CPU offloading) gives no plan, and the caller saves ``x`` itself.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

#: how deep :func:`plan_replay` follows the graph from ``x`` (an RMSNorm output in a cast model needs 3 levels)
MAX_DEPTH = 4

#: a replay program: an index into :attr:`Replay.tensors`, ``("mul", left, right)`` or ``("to", program, dtype)``
Program = Union[int, tuple]


class Replay(NamedTuple):
    """How to recompute one tensor: ``program`` over ``tensors`` (each kept by autograd for another node).

    Attributes:
        tensors: the tensors the program reads, e.g. ``(weight, h, rsqrt)`` of an RMSNorm output.
        program: nested tuples, ``("mul", p, q)``, ``("to", p, dtype)`` or an index into ``tensors``.
    """

    tensors: tuple[torch.Tensor, ...]
    program: Program

    @staticmethod
    def run(program: Program, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Evaluate ``program`` on ``tensors`` (the same tensors, or the ones autograd hands back in backward)."""
        if isinstance(program, int):
            return tensors[program]
        op, source, arg = program
        if op == "mul":
            return torch.mul(Replay.run(source, tensors), Replay.run(arg, tensors))
        return Replay.run(source, tensors).to(arg)


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are in effect (activation checkpointing, ``save_on_cpu``): no replay then.

    Under such hooks what the graph keeps is the hooks' business (a placeholder, a CPU copy), and reading it in
    the forward would unpack it.
    """
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def plan_replay(x: torch.Tensor) -> Optional[Replay]:
    """A :class:`Replay` recomputing ``x`` bit for bit from tensors its autograd graph keeps, or ``None``.

    The tensors the program reads that are as large as ``x`` (activations the graph keeps) are referenced, not
    copied; smaller ones (a norm's weight, per-row statistics) are copied now, so that a parameter released or
    re-sharded after its module's forward (ZeRO-3, FSDP) is read as it was. ``None`` when ``x`` has no graph
    (e.g. the first layer of a frozen model), is a view, or is made by an operation not listed in the module
    docstring within :data:`MAX_DEPTH` nodes; when a large operand is a parameter; when the program would not
    give ``x``'s shape and dtype; and whenever saved-tensor hooks are in effect or ``torch.compile`` traces.
    """
    fn = x.grad_fn
    if fn is None or x._base is not None or torch.compiler.is_compiling() or saved_tensor_hooks_active():
        return None
    tensors: list[torch.Tensor] = []
    try:
        program = _plan(fn, x.output_nr, tensors, MAX_DEPTH)
    except RuntimeError:  # a kept tensor was modified in place since: autograd itself will report it in backward
        return None
    if program is None:
        return None
    kept = []
    for t in tensors:
        if t.numel() < x.numel():
            kept.append(t.detach().clone())
        elif isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return None
        else:
            kept.append(t.detach())
    try:
        shape, dtype = _result_meta(program, kept)
    except RuntimeError:  # operands that do not broadcast (e.g. a parameter released after its forward)
        return None
    if shape != x.shape or dtype != x.dtype or any(t.device != x.device for t in kept):
        return None
    return Replay(tuple(kept), program)


def _result_meta(program: Program, tensors: list[torch.Tensor]) -> tuple[torch.Size, torch.dtype]:
    """The shape and dtype :meth:`Replay.run` would return, without computing it."""
    if isinstance(program, int):
        return tensors[program].shape, tensors[program].dtype
    op, source, arg = program
    shape, dtype = _result_meta(source, tensors)
    if op == "to":
        return shape, arg
    other_shape, other_dtype = _result_meta(arg, tensors)
    if len(shape) and len(other_shape):  # two dimensioned operands: plain promotion (the common case, cheap)
        return _broadcast(shape, other_shape), torch.promote_types(dtype, other_dtype)
    # torch's promotion treats 0-dim operands apart (``h * torch.tensor(2.0, dtype=float64)`` stays float32)
    standins = [torch.empty((1,) * len(s), dtype=d) for s, d in ((shape, dtype), (other_shape, other_dtype))]
    return torch.broadcast_shapes(shape, other_shape), torch.result_type(*standins)


def _broadcast(left: torch.Size, right: torch.Size) -> torch.Size:
    """The broadcast of two shapes (as :func:`torch.broadcast_shapes`); RuntimeError if they do not broadcast."""
    if len(left) < len(right):
        left, right = right, left
    right = (1,) * (len(left) - len(right)) + tuple(right)
    out = []
    for a, b in zip(left, right):
        if a != b and a != 1 and b != 1:
            raise RuntimeError(f"shapes {tuple(left)} and {tuple(right)} do not broadcast")
        out.append(a if b == 1 else b)
    return torch.Size(out)


def _leaf(t: torch.Tensor, tensors: list[torch.Tensor]) -> int:
    tensors.append(t)
    return len(tensors) - 1


def _plan(fn, output_nr: int, tensors: list[torch.Tensor], depth: int) -> Optional[Program]:
    """The program for output ``output_nr`` of node ``fn``; appends the tensors it reads to ``tensors``."""
    if depth == 0 or output_nr != 0:
        return None
    name = type(fn).__name__
    if name == "AccumulateGrad":
        return _leaf(fn.variable, tensors)
    if name == "MulBackward0":
        operands = []
        for attr, (node, nr) in zip(("_saved_self", "_saved_other"), fn.next_functions):
            kept = getattr(fn, attr)
            if kept is not None:
                operands.append(_leaf(kept, tensors))
                continue
            if node is None:
                return None
            sub = _plan(node, nr, tensors, depth - 1)
            if sub is None:
                return None
            operands.append(sub)
        return ("mul", operands[0], operands[1])
    if name == "ToCopyBackward0":
        meta = getattr(fn, "_input_metadata", None)  # the forward's output: what the copy produced
        node, nr = fn.next_functions[0]
        if not meta or node is None:
            return None
        sub = _plan(node, nr, tensors, depth - 1)
        if sub is None or any(tensors[i].device != meta[0].device for i in _indices(sub)):
            return None
        return ("to", sub, meta[0].dtype)
    return None


def _indices(program: Program) -> list[int]:
    if isinstance(program, int):
        return [program]
    if program[0] == "mul":
        return _indices(program[1]) + _indices(program[2])
    return _indices(program[1])

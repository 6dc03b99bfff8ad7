"""``PolyModel``: a transformers model with Poly/MHR adapters, and ``get_peft_model``.

``PolyModel`` is the public face (PEFT's ``PolyModel`` API plus ours); each method hands off to the module
whose role it is::

    planning and injecting adapters, the trainable set    injection.py   (plan_injection, inject, unload, ...)
    checkpoints: state dicts, checked reads, saves         persistence.py (read_checkpoint, save_adapters, ...)
    preparing a call: task ids, training routes            calls.py       (CallPreparation, traced_call)
    the per-call routing the layers read                   routing.py     (RoutingState.route, task_context)
    merging a task into the base weights                   layer.py       (PolyLayer.merge / unmerge)
    one task as a PEFT LoRA adapter                        export.py      (export_task)
    the task axis: names, checks, new tasks                tasks.py       (resolve_task, grow_tasks)
    being a transformers PreTrainedModel, reading as the wrapped model   pretrained.py
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn
from transformers import PreTrainedModel

from . import injection
from .calls import CallPreparation, traced_call
from .checkpoint import check_adapter_name, check_new_adapter_name
from .config import PolyConfig
from .export import export_task, export_tasks
from .injection import InjectionPlan, plan_injection
from .layer import PolyAdapter, PolyLayer
from .modules_to_save import ModulesToSave
from .persistence import (
    adapter_state_dict, check_save_directory, frozen_state_keys, load_adapter_tensors, read_checkpoint, save_adapters,
)
from .router import PolyRouter
from .pretrained import delegate_pretrained_attributes, own_names
from .routing import RoutingState, TaskIds, call_batch_size
from .signature import bind_forward, forward_state
from .tasks import grow_tasks, resolve_task
from .variants import eval_routing_weights


class PolyModel(PreTrainedModel):
    """A transformers model whose target layers carry Poly/MHR adapters (drop-in for PEFT's Poly model).

    Every call takes ``task_ids``: one task per example (a LongTensor ``(batch,)``, a list of ints or names),
    checked, then handed to all adapted layers through the model's :class:`RoutingState` for that call.

    Args:
        model: the transformers model to adapt. Its parameters are frozen; only adapter weights (and the
            ``modules_to_save`` copies) train.
        config: the adapter's :class:`PolyConfig`.
        adapter_name: name of the first adapter (see :func:`~polytropon.checkpoint.check_adapter_name`: ASCII
            letters, digits, ``_`` and ``-``).

    Attribute reads that PolyModel does not define fall through to the wrapped model (``model.config``).
    It is a ``transformers.PreTrainedModel`` (so ``transformers.Trainer`` saves it with :meth:`save_pretrained`)
    whose ``PreTrainedModel`` attributes read the wrapped model's, as the fall-through did (:mod:`polytropon.pretrained`).
    """

    def __init__(self, model: nn.Module, config: PolyConfig, adapter_name: str = "default") -> None:
        nn.Module.__init__(self)  # not PreTrainedModel.__init__: see polytropon.pretrained
        check_adapter_name(adapter_name)
        plan = plan_injection(model, config)  # before any change to the model
        self.model = model
        self.peft_config: dict[str, PolyConfig] = {}
        self.routing = RoutingState()
        self._calls = CallPreparation(self.routing, self.peft_config)
        injection.freeze_base(model)
        self._inject(adapter_name, plan)
        self.set_adapter(adapter_name)
        self.training = model.training
        self.forward = bind_forward(self, type(self).forward)  # shows the wrapped model's parameters + task_ids

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super(PreTrainedModel, cls).__init_subclass__(**kwargs)  # not PreTrainedModel's (it derives a config_class)

    def __getstate__(self) -> dict[str, Any]:
        return forward_state(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.forward = bind_forward(self, type(self).forward)

    # ------------------------------------------------------------------ adapters
    def _inject(self, adapter_name: str, plan: InjectionPlan) -> None:
        injection.inject(self.model, self.routing, adapter_name, plan)
        self.peft_config[adapter_name] = plan.config
        self._calls.forget_routers()

    def poly_layers(self) -> Iterator[tuple[str, PolyLayer]]:
        """``(path, PolyLayer)`` of every adapted layer, in the order of the model's modules."""
        return injection.poly_layers(self.model)

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        """``(path, ModulesToSave)`` of every module trained and saved beside the adapters (e.g. a head)."""
        return injection.saved_modules(self.model)

    def named_adapters(self, adapter_name: Optional[str] = None) -> list[tuple[str, PolyAdapter]]:
        """``(layer path, PolyAdapter)`` of every layer carrying ``adapter_name`` (default: active); ValueError if unknown."""
        adapter_name = self.resolve_adapter(adapter_name)
        return [(path, layer.adapters[adapter_name]) for path, layer in self.poly_layers() if adapter_name in layer.adapters]

    def _check_adapter(self, adapter_name: Any) -> None:
        if not isinstance(adapter_name, str) or adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; existing adapters: {sorted(self.peft_config)}")

    def resolve_adapter(self, adapter_name: Optional[str] = None) -> str:
        """``adapter_name``, or the active adapter when ``None``; ValueError naming the existing ones if no such adapter."""
        name = self.routing.active_adapter if adapter_name is None else adapter_name
        self._check_adapter(name)
        return name

    def resolve_task_id(self, task: Union[int, str], adapter_name: Optional[str] = None) -> int:
        """A task given by id or name as a checked id of ``adapter_name`` (:func:`polytropon.tasks.resolve_task`)."""
        adapter_name = self.resolve_adapter(adapter_name)
        return resolve_task(task, self.peft_config[adapter_name], adapter_name)

    def add_adapter(self, adapter_name: str, config: PolyConfig) -> None:
        """Add another adapter (not active, not trainable until :meth:`set_adapter`).

        TypeError, ValueError, before any change: an invalid or taken name, or a config that does not fit.
        """
        check_new_adapter_name(adapter_name, self.peft_config)
        if self.routing.merged_task is not None:
            raise ValueError("cannot add an adapter while a task is merged: call unmerge_adapter() first")
        self._inject(adapter_name, plan_injection(self.model, config))
        self._update_trainable()

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the adapter every layer applies, and the only trainable one."""
        self._check_adapter(adapter_name)
        if self.routing.merged_task is not None and self.routing.merged_task[0] != adapter_name:
            raise ValueError("cannot switch adapters while a task is merged: call unmerge_adapter() first")
        self.routing.active_adapter = adapter_name
        self._update_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer; if it was active, another one (if any) becomes active."""
        self._check_adapter(adapter_name)
        if self.routing.merged_task is not None and self.routing.merged_task[0] == adapter_name:
            raise ValueError(f"adapter {adapter_name!r} is merged: call unmerge_adapter() first")
        injection.remove_adapter(self.model, adapter_name)
        del self.peft_config[adapter_name]
        self._calls.forget_routers()
        if self.routing.active_adapter == adapter_name:
            self.routing.active_adapter = next(iter(self.peft_config), None)
        self._update_trainable()

    def _update_trainable(self) -> None:
        injection.update_trainable(self.model, self.peft_config, self.routing.active_adapter)

    @property
    def active_adapter(self) -> Optional[str]:
        """Name of the adapter in use."""
        return self.routing.active_adapter

    @property
    def active_adapters(self) -> list[str]:  # PEFT's plural form
        return [] if self.routing.active_adapter is None else [self.routing.active_adapter]

    @property
    def recompute_inputs(self) -> bool:
        """Whether training recomputes adapted layers' inputs in backward instead of keeping them (default ``True``).

        A LoRA-style update needs its layer's input ``x`` for the gradient of ``A`` (``dA = x^T dh``), which a
        frozen base layer does not keep. Where ``x`` is an elementwise product of tensors the base model's
        backward keeps anyway — a Llama-style RMSNorm output ``weight * (h * rsqrt(mean(h^2) + eps))``, a gated
        MLP activation ``silu(g) * u`` — the layer keeps those instead and recomputes ``x`` from them in backward,
        bit for bit (only correctly rounded products and casts are replayed: :mod:`polytropon.recompute`).
        Gradients are identical either way; with ``True`` a training step keeps less memory (the benchmark's
        Llama-style model: the peak from 1.25x to 1.01x the frozen base's). Elsewhere (a LayerNorm output, a view,
        the first layer of a frozen model, activation checkpointing) ``x`` is kept as with ``False``.

        Raises:
            TypeError: on setting anything but a ``bool``.
        """
        return self.routing.recompute_inputs

    @recompute_inputs.setter
    def recompute_inputs(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"recompute_inputs must be a bool, got {value!r} of type {type(value).__name__}")
        self.routing.recompute_inputs = value

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: inside it the model computes the base model's outputs (task ids not needed)."""
        merged = self.routing.merged_task
        self.unmerge_adapter()
        try:
            with self.routing.adapters_disabled():
                yield
        finally:
            if merged is not None:
                self.merge_adapter(merged[1], adapter_name=merged[0])

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with the adapter layers in place)."""
        return self.model

    # ------------------------------------------------------------------ the task axis and trainable set
    def add_tasks(
        self, tasks: Union[int, list[str]], init: Union[str, int] = "uniform", adapter_name: Optional[str] = None
    ) -> list[int]:
        """Add tasks (a count or names) after training, returning their ids: new router rows by ``init`` (``"uniform"``,
        ``"average"`` or an existing task's), trained rows unchanged (:func:`polytropon.tasks.grow_tasks`)."""
        adapter_name = self.resolve_adapter(adapter_name)
        config = self.peft_config[adapter_name]
        new_config = grow_tasks(config, self.named_adapters(adapter_name), tasks, init, adapter_name)
        self.peft_config[adapter_name] = new_config
        return list(range(config.n_tasks, new_config.n_tasks))

    def freeze_skills(self, adapter_name: Optional[str] = None, freeze_saved_modules: bool = True) -> int:
        """MHR-z: freeze the skills (and saved copies), only the routing trains; returns the trainable count
        (:func:`polytropon.injection.freeze_skills`). :meth:`set_adapter` restores the default trainable set."""
        adapter_name = self.resolve_adapter(adapter_name)
        injection.freeze_skills(self.model, self.peft_config, adapter_name, self.active_adapter, freeze_saved_modules)
        return self.get_nb_trainable_parameters()[0]

    def routing_weights(
        self, task: Optional[Union[int, str]] = None, adapter_name: Optional[str] = None
    ) -> dict[str, torch.Tensor]:
        """Eval routing weights: layer path -> float32 CPU ``(n_tasks, n_splits, n_skills)`` (``(n_splits, n_skills)``
        for one ``task``); each split sums to 1 (:func:`polytropon.variants.eval_routing_weights`)."""
        adapter_name = self.resolve_adapter(adapter_name)
        index = None if task is None else self.resolve_task_id(task, adapter_name)
        return eval_routing_weights(self.named_adapters(adapter_name), self.peft_config[adapter_name].n_tasks, index)

    # ------------------------------------------------------------------ calls
    @contextmanager
    def task_context(self, task_ids: Union[TaskIds, int, str]) -> Iterator[None]:
        """Route every call inside the block that gives no ``task_ids`` (``forward``, ``generate``, and direct calls
        of :meth:`get_base_model`, e.g. by a transformers ``pipeline``) to these tasks::

            with model.task_context("sst2"):                    # or an id, or one id/name per example
                pipeline("text-classification", model=model.get_base_model(), tokenizer=tok)("great film")

        One id or name for a batch of any size, or one per example; an explicit ``task_ids=`` wins; blocks nest
        and belong to the current thread or asyncio task. TypeError / ValueError for bad ids, checked on entry.
        """
        if isinstance(task_ids, (int, str)) and not isinstance(task_ids, bool):
            task_ids = [task_ids]
        ids = self._calls.check(task_ids, None, self.training)
        with self.routing.task_context(ids):
            yield

    def _manage_pre_hooks(self, task_ids: Union[TaskIds, int, str]) -> Any:
        """PEFT's spelling of :meth:`task_context` (``with peft_model._manage_pre_hooks(task_ids=...):``)."""
        return self.task_context(task_ids)

    def forward(self, *args: Any, task_ids: Optional[TaskIds] = None, labels: Any = None, **kwargs: Any) -> Any:
        """Run the wrapped model (its own ``*args, **kwargs``) with every example routed to its task.

        ``task_ids``: ``(batch,)`` LongTensor or list of ints or task names, one per example, or one for the
        batch; required while an adapter routes, unless a :meth:`task_context` gives them. Checked before the
        model runs (:mod:`polytropon.calls`): ValueError (missing, out of range, not one per example or one for
        all), TypeError (not integers or names). ``labels`` is passed on when given (named here because trainers
        find the label columns in the class's signature). Each model's ``forward`` shows the wrapped model's
        parameters plus ``task_ids`` to ``inspect.signature`` (:mod:`polytropon.signature`).
        """
        if labels is not None:
            kwargs["labels"] = labels
        batch_size = call_batch_size(args, kwargs)
        if torch.compiler.is_compiling():  # see docs/deploy.md, "torch.compile"
            ids, routes = traced_call(self._calls, task_ids, batch_size, self.training, self.poly_layers)
        else:
            ids = self._calls.task_ids(task_ids, batch_size, self.training)
            routes = self._presample(ids)
        with self.routing.route(ids, routes):
            return self.model(*args, **kwargs)

    def _presample(self, task_ids: Optional[torch.Tensor]) -> Optional[dict[int, torch.Tensor]]:
        """The training routes of every learned router, drawn at once (:meth:`CallPreparation.routes`)."""
        return self._calls.routes(task_ids, self.training, self.poly_layers)

    def _active_routers(self) -> list[PolyRouter]:
        """The distinct learned routers of the active adapter, in the order of the layers (cached)."""
        return self._calls.learned_routers(self.poly_layers)

    def generate(self, *args: Any, task_ids: Optional[TaskIds] = None, **kwargs: Any) -> Any:
        """``model.generate`` with ``task_ids`` as in :meth:`forward`; beams and returned sequences keep their task."""
        ids = self._calls.task_ids(task_ids, call_batch_size(args, kwargs), self.training)
        with self.routing.route(ids):
            return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ merging and export
    def merge_adapter(self, task_id: int, adapter_name: Optional[str] = None) -> None:
        """Fold task ``task_id`` (id or name) into every adapted layer's weight: ``W <- W + A_t @ B_t``, the eval-routing
        mixture with ``1/r`` in ``B_t`` (:meth:`PolyLayer.merge <polytropon.layer.PolyLayer.merge>`); the layers then
        run their base module only and other tasks' ids raise. ``adapter_name`` becomes active; errors come first."""
        adapter_name = self.resolve_adapter(adapter_name or None)
        task_id = self.resolve_task_id(task_id, adapter_name)
        if self.routing.merged_task == (adapter_name, task_id):
            return
        injection.check_mergeable_layers(self.model, adapter_name)  # before anything changes
        self.unmerge_adapter()
        if adapter_name != self.routing.active_adapter:
            self.set_adapter(adapter_name)
        injection.merge_task(self.model, adapter_name, task_id)
        self.routing.merged_task = (adapter_name, task_id)

    @property
    def merged_task(self) -> Optional[int]:
        """The task id merged into the base weights, or ``None``."""
        merged = self.routing.merged_task
        return None if merged is None else merged[1]

    def unmerge_adapter(self) -> None:
        """Subtract the merged task (the very factors each layer added) and route by ``task_ids`` again; else no-op."""
        if self.routing.merged_task is not None:
            injection.unmerge_task(self.model)
            self.routing.merged_task = None

    def merge_and_unload(self, task_id: int, adapter_name: Optional[str] = None) -> nn.Module:
        """Return the plain base model (its own class) with task ``task_id`` folded into its weights.

        ``modules_to_save`` are replaced by the adapter's trained copies. The PolyModel is consumed.
        """
        self.merge_adapter(task_id, adapter_name)
        self.routing.merged_task = None
        return injection.unload(self.model, keep_copy_of=self.routing.active_adapter)

    def unload(self) -> nn.Module:
        """Return the plain base model with every adapter module removed (and any merged task subtracted)."""
        self.unmerge_adapter()
        return injection.unload(self.model)

    def export_lora(
        self, save_directory: Union[str, os.PathLike], task_id: int, adapter_name: Optional[str] = None
    ) -> None:
        """Write one task as a standard PEFT LoRA adapter (``"peft_type": "LORA"``) in ``save_directory``.

        ``lora_A = A_t^T``, ``lora_B = B_t^T``, ``lora_alpha = 1`` and the ``modules_to_save`` copies, so
        ``peft.PeftModel.from_pretrained(base_model, save_directory)`` computes what this model computes for the
        task (:mod:`polytropon.export`). TypeError / ValueError for a bad task or adapter, or a file at
        ``save_directory``; nothing is written then.
        """
        adapter_name = self.resolve_adapter(adapter_name)
        task_id = self.resolve_task_id(task_id, adapter_name)
        export_task(os.fspath(save_directory), self.peft_config[adapter_name], self.poly_layers(),
                    self.saved_modules(), task_id, adapter_name)

    def export_lora_all(
        self,
        save_directory: Union[str, os.PathLike],
        adapter_name: Optional[str] = None,
        tasks: Optional[list[Union[int, str]]] = None,
        names: Optional[list[str]] = None,
    ) -> dict[str, Any]:
        """Every task (or ``tasks``) as its own PEFT LoRA adapter in ``save_directory/<name>``, plus a manifest for
        multi-LoRA servers (vLLM's ``--lora-modules``); all or nothing, checked first (:func:`~polytropon.export.export_tasks`)."""
        adapter_name = self.resolve_adapter(adapter_name)
        return export_tasks(os.fspath(save_directory), self.peft_config[adapter_name], self.poly_layers(),
                            self.saved_modules(), tasks, adapter_name, names,
                            resolve=lambda task: self.resolve_task_id(task, adapter_name))

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable parameters, all parameters)``, each shared tensor counted once."""
        return injection.count_parameters(self.parameters())

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ checkpoints
    def adapter_state_dict(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's checkpoint key names (see :mod:`polytropon.persistence`)."""
        return adapter_state_dict(self.model, self.resolve_adapter(adapter_name or None))

    def save_pretrained(self, save_directory: Union[str, os.PathLike], selected_adapters: Optional[list[str]] = None, **kwargs: Any) -> None:
        """Save adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``, atomically.

        ``"default"`` goes to ``save_directory``, others to ``save_directory/<name>``. FSDP2 / ZeRO-3: every rank
        calls it, rank 0 writes. ``state_dict=`` / ``is_main_process=`` as ``transformers.Trainer`` passes them;
        with ``is_main_process=`` the trainable tensors also go to ``model.safetensors`` so that the Trainer
        resumes (:func:`~polytropon.persistence.save_adapters`). ValueError before anything is written.
        """
        save_directory = check_save_directory(save_directory)
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_adapter(name)
        configs = {name: self.peft_config[name] for name in names}
        save_adapters(self, save_directory, configs, kwargs.get("state_dict"), kwargs.get("is_main_process", True),
                      trainer_state="is_main_process" in kwargs)

    @property
    def _keys_to_ignore_on_save(self) -> list[str]:
        """The keys a trainer's ``model.safetensors`` leaves out (frozen base, inactive adapters): not "missing"."""
        return frozen_state_keys(self)

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False, **kwargs: Any) -> None:
        """Load a saved adapter (ours or PEFT's) as ``adapter_name``, read and checked in full first
        (:func:`~polytropon.persistence.read_checkpoint`); trainable only with ``is_trainable``; not made active."""
        check_new_adapter_name(adapter_name, self.peft_config)
        config = PolyConfig.from_pretrained(os.fspath(model_id))
        config.inference_mode = not is_trainable
        plan, tensors = read_checkpoint(self.model, model_id, config)
        self._inject(adapter_name, plan)
        load_adapter_tensors(self.model, adapter_name, tensors)
        self._update_trainable()

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: Union[str, os.PathLike], adapter_name: str = "default",
        is_trainable: bool = False, config: Optional[PolyConfig] = None, **kwargs: Any,
    ) -> "PolyModel":
        """Wrap ``model`` with the adapter saved in ``model_id`` (by polytropon or PEFT), read and checked before
        ``model`` is touched (:func:`~polytropon.persistence.read_checkpoint`); frozen and in eval mode unless
        ``is_trainable``."""
        check_adapter_name(adapter_name)
        model_id = os.fspath(model_id)
        config = PolyConfig.from_pretrained(model_id) if config is None else config
        plan, tensors = read_checkpoint(model, model_id, dataclasses.replace(config, inference_mode=not is_trainable))
        poly = cls(model, plan.config, adapter_name)
        load_adapter_tensors(poly.model, adapter_name, tensors)
        if not is_trainable:
            poly.eval()
        return poly

    # ------------------------------------------------------------------ attribute fall-through
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


delegate_pretrained_attributes(PolyModel, own_names(vars(PolyModel)))


def get_peft_model(model: nn.Module, peft_config: PolyConfig, adapter_name: str = "default", **kwargs: Any) -> PolyModel:
    """Wrap ``model`` with a new Poly/MHR adapter (same call as ``peft.get_peft_model``).

    Raises:
        TypeError: ``peft_config`` is not a :class:`PolyConfig`, or a target is not Linear/Conv1D.
        ValueError: targets match nothing, or ``n_splits`` does not divide a target layer's widths.
    """
    return PolyModel(model, peft_config, adapter_name)

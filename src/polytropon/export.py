"""Export one task of a Poly/MHR adapter as a standard PEFT LoRA adapter.

With eval routing a task's update in every adapted layer is a rank-``r`` product (see
:class:`~polytropon.layer.PolyAdapter`)::

    y = W x + x @ A_t @ B_t / r          A_t (in_features, r),  B_t (r, out_features)  (B_t unscaled here)

which is exactly PEFT's LoRA forward ``y = W x + scaling * lora_B(lora_A(x))`` with ``scaling = lora_alpha / r``
when::

    lora_A.weight = A_t.T            (r, in_features)
    lora_B.weight = B_t.T            (out_features, r)
    lora_alpha    = 1                (so scaling = 1 / r, as ours; use_rslora = False)

The directory written is an ordinary PEFT LoRA adapter::

    adapter_config.json          "peft_type": "LORA", r, lora_alpha, fan_in_fan_out (True for GPT-2 Conv1D),
                                 target_modules (the adapted modules' full paths), modules_to_save, task_type
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight        (r, in_features)
                                 base_model.model.<module path>.lora_B.weight        (out_features, r)
                                 base_model.model.<saved module path>.<param>        modules_to_save copies

so ``peft.PeftModel.from_pretrained(base_model, directory)`` (or any LoRA server) serves the task.

Every task at once (:func:`write_lora_tasks`, ``PolyModel.export_lora_all``) gives one such directory per task and
a manifest in the form multi-LoRA servers take (vLLM: ``--lora-modules name=path ...``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import torch

from .checkpoint import KEY_PREFIX, WEIGHTS_NAME, atomic_write_bytes, save_tensors
from .config import CONFIG_NAME, PolyConfig
from .layer import PolyLayer
from .modules_to_save import ModulesToSave

LORA_PEFT_TYPE = "LORA"

#: ``(module path, module)`` pairs as :meth:`PolyModel.poly_layers` / :meth:`PolyModel.saved_modules` yield them
Layers = Iterable[tuple[str, PolyLayer]]
SavedModules = Iterable[tuple[str, ModulesToSave]]


def lora_state_dict(layers: Layers, saved: SavedModules, task_id: int, adapter_name: str) -> dict[str, torch.Tensor]:
    """The task's LoRA tensors under PEFT's LoRA key names (plus the adapter's ``modules_to_save`` copies).

    ``task_id`` and ``adapter_name`` must already be checked.
    """
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for path, layer in layers:
            if adapter_name not in layer.adapters:
                continue
            a, b = layer.adapters[adapter_name].task_factors(task_id, scaled=False)
            out[f"{KEY_PREFIX}{path}.lora_A.weight"] = a.T.contiguous()
            out[f"{KEY_PREFIX}{path}.lora_B.weight"] = b.T.contiguous()
        for path, wrapper in saved:
            if adapter_name in wrapper.modules_to_save:
                for name, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                    out[f"{KEY_PREFIX}{path}.{name}"] = tensor
    return out


def lora_config_dict(config: PolyConfig, layers: Layers, saved: SavedModules, adapter_name: str) -> dict[str, Any]:
    """``adapter_config.json`` of the exported LoRA adapter, in PEFT's ``LoraConfig`` schema."""
    targets, fan_in_fan_out = [], []
    for path, layer in layers:
        if adapter_name in layer.adapters:
            targets.append(path)
            fan_in_fan_out.append(layer.fan_in_fan_out)
    saved_paths = sorted(path for path, wrapper in saved if adapter_name in wrapper.modules_to_save)
    return {
        "peft_type": LORA_PEFT_TYPE,
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": config.revision,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_bias": False,
        # PEFT applies the flag per layer type anyway (True for Conv1D, False for Linear); record the majority
        "fan_in_fan_out": sum(fan_in_fan_out) * 2 > len(fan_in_fan_out),
        "target_modules": sorted(targets),
        "exclude_modules": None,
        "modules_to_save": saved_paths or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "auto_mapping": None,
    }


def write_lora(save_directory: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write a LoRA adapter directory; each file atomically (temporary file + rename).

    Raises:
        ValueError: ``save_directory`` is a file (nothing is written).
    """
    if os.path.isfile(save_directory):
        raise ValueError(f"{save_directory}: expected a directory, found a file")
    os.makedirs(save_directory, exist_ok=True)
    save_tensors(os.path.join(save_directory, WEIGHTS_NAME), tensors)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), text.encode("utf-8"))


def export_task(
    save_directory: str, config: PolyConfig, layers: Layers, saved: SavedModules, task_id: int, adapter_name: str
) -> None:
    """Write task ``task_id`` (a checked id) of ``adapter_name`` as a PEFT LoRA adapter in ``save_directory``."""
    layers, saved = list(layers), list(saved)
    tensors = lora_state_dict(layers, saved, task_id, adapter_name)
    write_lora(save_directory, tensors, lora_config_dict(config, layers, saved, adapter_name))


# ---------------------------------------------------------------------- every task at once (multi-LoRA serving)
#: the manifest of an all-task export: one entry per task (name, path, task_id, base_model_name, r)
MANIFEST_NAME = "lora_modules.json"
#: the same as vLLM's command-line argument: ``--lora-modules name=path name=path ...``
LORA_MODULES_NAME = "lora_modules.txt"

#: the rule for a served adapter's name (its folder name and its name in ``--lora-modules name=path``)
SERVED_NAME_RULE = "ASCII letters, digits, '_', '-' and '.', starting with a letter, digit or '_', at most 128 characters"
_SERVED_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
#: the values vLLM accepts for ``--max-lora-rank`` (its ``LoRAConfig.max_lora_rank``)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(r: int) -> Optional[int]:
    """The smallest ``--max-lora-rank`` vLLM accepts that serves rank ``r`` (``None`` above 512)."""
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= r), None)


def served_names(task_ids: Sequence[int], names: Optional[Sequence[str]]) -> list[str]:
    """The served name (and folder name) of each task: ``names[task_id]``, or ``task_<id>`` without names.

    Raises:
        ValueError: a name breaks :data:`SERVED_NAME_RULE` (it would not be a safe folder name, or it would
            break vLLM's ``name=path`` syntax), or two tasks get the same name.
    """
    out = [f"task_{t}" if names is None else names[t] for t in task_ids]
    for task_id, name in zip(task_ids, out):
        if not isinstance(name, str) or _SERVED_NAME.fullmatch(name) is None:
            raise ValueError(
                f"task {task_id} is named {name!r}, which cannot name an exported adapter (a folder and a "
                f"--lora-modules name): names need {SERVED_NAME_RULE}; pass names=[...] with one such name per task"
            )
    duplicates = sorted({n for n in out if out.count(n) > 1})
    if duplicates:
        raise ValueError(f"tasks to export repeat: {duplicates}; give each task once")
    return out


def check_new_directory(save_directory: str) -> str:
    """``save_directory`` as an absolute path, checked to be new or an empty directory.

    Raises:
        ValueError: it is a file, or a directory that is not empty (nothing is written).
    """
    path = os.path.abspath(save_directory)
    if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)):
        raise ValueError(f"{save_directory}: exists and is not an empty directory; an export needs a new or empty one")
    if not os.path.isdir(os.path.dirname(path)):
        raise ValueError(f"{save_directory}: its parent directory {os.path.dirname(path)} does not exist")
    return path


def lora_modules_argument(entries: Sequence[dict[str, Any]]) -> str:
    """``--lora-modules name=path name=path ...`` for vLLM, each ``name=path`` quoted for a POSIX shell."""
    return "--lora-modules " + " ".join(shlex.quote(f"{e['name']}={e['path']}") for e in entries)


def write_lora_tasks(
    save_directory: str,
    tasks: Sequence[tuple[str, int, dict[str, torch.Tensor]]],
    config: dict[str, Any],
) -> dict[str, Any]:
    """Write one LoRA adapter per task, a manifest and the ``--lora-modules`` argument, all or nothing.

    Everything is written to a temporary directory beside ``save_directory`` and renamed into place at the
    end, so an export that fails leaves no directory (or the empty one it was given)::

        save_directory/<name>/adapter_config.json         one PEFT LoRA adapter per task (see write_lora)
        save_directory/<name>/adapter_model.safetensors
        save_directory/lora_modules.json                  {"base_model_name_or_path", "r", "vllm_max_lora_rank", "adapters": [
                                                              {"name", "path", "task_id", "base_model_name", "r"}]}
        save_directory/lora_modules.txt                   --lora-modules name=/abs/path/name ...

    Args:
        save_directory: a new or empty directory (checked by :func:`check_new_directory`).
        tasks: ``(name, task_id, LoRA tensors)`` of each task, names checked by :func:`served_names`.
        config: the LoRA ``adapter_config.json`` shared by all tasks (:func:`lora_config_dict`).

    Returns:
        the manifest (as written to ``lora_modules.json``), with ``"lora_modules"``: the argument string.
    """
    final = check_new_directory(save_directory)
    base = config.get("base_model_name_or_path")
    entries = [
        {"name": name, "path": os.path.join(final, name), "task_id": task_id, "base_model_name": base, "r": config["r"]}
        for name, task_id, _ in tasks
    ]
    manifest = {"base_model_name_or_path": base, "r": config["r"], "vllm_max_lora_rank": vllm_max_lora_rank(config["r"]),
                "adapters": entries}
    argument = lora_modules_argument(entries)
    staging = tempfile.mkdtemp(prefix="." + os.path.basename(final) + ".", suffix=".tmp", dir=os.path.dirname(final))
    try:
        for name, _, tensors in tasks:
            write_lora(os.path.join(staging, name), tensors, config)
        text = json.dumps(manifest, indent=2) + "\n"
        atomic_write_bytes(os.path.join(staging, MANIFEST_NAME), text.encode("utf-8"))
        atomic_write_bytes(os.path.join(staging, LORA_MODULES_NAME), (argument + "\n").encode("utf-8"))
        if os.path.isdir(final):
            os.rmdir(final)  # empty (checked); fails if something appeared meanwhile, and nothing is replaced
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**manifest, "lora_modules": argument}


def export_tasks(
    save_directory: str,
    config: PolyConfig,
    layers: Layers,
    saved: SavedModules,
    tasks: Optional[Sequence[Any]],
    adapter_name: str,
    names: Optional[Sequence[str]] = None,
    resolve: Callable[[Any], int] = int,
) -> dict[str, Any]:
    """Write ``tasks`` (ids or names, ``resolve`` d to checked ids; ``None``: every task) of ``adapter_name`` as PEFT
    LoRA adapters with a serving manifest.

    Folder names are ``names[task_id]``, else ``config.task_names[task_id]``, else ``task_<id>``
    (:func:`served_names`); the directory must be new or empty (:func:`check_new_directory`). Everything is
    checked before anything is written; see :func:`write_lora_tasks` for what is written.

    Returns:
        the manifest (as written to ``lora_modules.json``), with ``"lora_modules"``: vLLM's argument string.

    Raises:
        TypeError, ValueError: ``tasks`` is not a non-empty list, a task is unknown, ``names`` is not one name per
            task, a name is unfit, a task repeats, or the directory is not new or empty.
    """
    if tasks is not None and (not isinstance(tasks, (list, tuple)) or not tasks):
        raise ValueError(f"tasks must be a non-empty list of task ids or names, got {tasks!r}")
    task_ids = [resolve(t) for t in (range(config.n_tasks) if tasks is None else tasks)]
    if names is not None and (not isinstance(names, (list, tuple)) or len(names) != config.n_tasks):
        raise ValueError(f"names must be a list of {config.n_tasks} names (one per task of {adapter_name!r}), got {names!r}")
    folders = served_names(task_ids, names if names is not None else config.task_names)
    check_new_directory(save_directory)
    layers, saved = list(layers), list(saved)
    exported = [(name, t, lora_state_dict(layers, saved, t, adapter_name)) for name, t in zip(folders, task_ids)]
    return write_lora_tasks(save_directory, exported, lora_config_dict(config, layers, saved, adapter_name))

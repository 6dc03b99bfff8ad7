"""Checkpoint files in PEFT's format: key names, safetensors I/O and atomic writes.

An adapter saved in ``save_directory`` (a non-default adapter in ``save_directory/<adapter name>``) is::

    adapter_config.json            PolyConfig.to_dict(), "peft_type": "POLY"
    adapter_model.safetensors      base_model.model.<module path>.poly_lora_A                  (n_splits, n_skills, in/n_splits, r)
                                   base_model.model.<module path>.poly_lora_B                  (n_splits, n_skills, r, out/n_splits)
                                   base_model.model.<module path>.poly_router.module_logits    (n_tasks, n_splits*n_skills)
                                   base_model.model.<saved module path>.<param>                modules_to_save copies

A trainer's checkpoint (``save_pretrained`` called with ``is_main_process=``, as ``transformers.Trainer`` calls
it) also holds ``model.safetensors`` (:data:`TRAINER_STATE_NAME`): every trainable tensor under the PolyModel's
own parameter names (``model.layers.0.self_attn.q_proj.adapters.default.poly_lora_A``, ...), adapter-sized; PEFT
ignores it.

Weights are read from safetensors only; pickled ``.bin`` files are never loaded.

Adapter names are identifiers (:func:`check_adapter_name`), and the one path built from a name -- an adapter's
folder in a save directory -- must resolve (symlinks followed) inside that directory (:func:`adapter_directory`).
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Container, Mapping

import torch
from torch import nn

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
#: Written beside the adapter when a trainer saves (``save_pretrained(..., is_main_process=...)``): every trainable
#: tensor under the model's own parameter names -- what ``transformers.Trainer`` loads to resume.
TRAINER_STATE_NAME = "model.safetensors"
KEY_PREFIX = "base_model.model."
ADAPTER_KEYS = ("poly_lora_A", "poly_lora_B", "poly_router.module_logits")


#: the rule for adapter names, as error messages state it
ADAPTER_NAME_RULE = (
    "ASCII letters, digits, '_' and '-', starting with a letter, digit or '_', at most 128 characters "
    "(e.g. 'default', 'task-1', 'lora_v2')"
)
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}")
_MODULE_DICT = nn.ModuleDict()  # adapters live in ModuleDicts: a name must not shadow one of their attributes


def check_adapter_name(name: object, what: str = "adapter_name") -> str:
    """Return ``name`` if it is a valid adapter name, else raise.

    An adapter's name is a key of the layers' ``nn.ModuleDict`` and, for an adapter other than ``"default"``,
    the name of its folder when saved: it must follow :data:`ADAPTER_NAME_RULE` (so it holds no path separator,
    no ``.`` -- torch refuses dots in module names -- and is never ``..`` or an absolute path) and must not be
    an attribute of ``nn.ModuleDict`` (``"train"``, ``"keys"``, ...).

    Raises:
        TypeError: ``name`` is not a string. ValueError: it breaks the rule (the message states it).
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, got {type(name).__name__} ({name!r})")
    if _ADAPTER_NAME.fullmatch(name) is None:
        raise ValueError(f"{what} {name!r} is not a valid adapter name: use {ADAPTER_NAME_RULE}")
    if hasattr(_MODULE_DICT, name):
        raise ValueError(
            f"{what} {name!r} is reserved (an attribute of torch.nn.ModuleDict, which holds the adapters): "
            "choose another name"
        )
    return name


def check_new_adapter_name(name: object, existing: Container[str]) -> str:
    """:func:`check_adapter_name`, and ValueError if an adapter of that name already exists."""
    check_adapter_name(name)
    if name in existing:
        raise ValueError(f"an adapter named {name!r} already exists")
    return name


def is_inside(root: str, path: str) -> bool:
    """Whether ``path`` is ``root`` or lies below it (both absolute and normalised by the caller)."""
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # different drives (Windows)
        return False


def adapter_directory(save_directory: str, adapter_name: str) -> str:
    """Where an adapter lives: the directory itself for ``"default"``, else a subfolder named after it.

    Raises:
        TypeError, ValueError: an invalid adapter name (:func:`check_adapter_name`), or a subfolder that resolves
        outside ``save_directory`` (e.g. a symbolic link to elsewhere); nothing is created.
    """
    check_adapter_name(adapter_name)
    if adapter_name == "default":
        return save_directory
    directory = os.path.join(save_directory, adapter_name)
    root, resolved = os.path.realpath(save_directory), os.path.realpath(directory)
    if not is_inside(root, resolved) or resolved == root:
        raise ValueError(
            f"{directory}: the folder of adapter {adapter_name!r} resolves to {resolved}, outside the save "
            f"directory {root}; nothing is written there"
        )
    return directory


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(path: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Atomically write ``tensors`` (copied to contiguous CPU tensors) as a safetensors file."""
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata={"format": "pt"}))


def load_tensors(directory: str) -> tuple[str, dict[str, torch.Tensor]]:
    """Read ``adapter_model.safetensors`` from ``directory``; returns ``(path, tensors)``.

    Raises:
        FileNotFoundError: no safetensors file (a pickled ``adapter_model.bin`` is refused by name).
        ValueError: the file is truncated, corrupt or not safetensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
        hint = f" ({LEGACY_WEIGHTS_NAME} is present, but pickled weights are never loaded)" if os.path.isfile(legacy) else ""
        raise FileNotFoundError(f"{path}: adapter weights not found{hint}")
    try:
        return path, load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None

"""Checkpoint files in PEFT's format: key names, safetensors I/O and atomic writes.

An adapter saved in ``save_directory`` (a non-default adapter in ``save_directory/<adapter name>``) is::

    adapter_config.json            PolyConfig.to_dict(), "peft_type": "POLY"
    adapter_model.safetensors      base_model.model.<module path>.poly_lora_A                  (n_splits, n_skills, in/n_splits, r)
                                   base_model.model.<module path>.poly_lora_B                  (n_splits, n_skills, r, out/n_splits)
                                   base_model.model.<module path>.poly_router.module_logits    (n_tasks, n_splits*n_skills)
                                   base_model.model.<saved module path>.<param>                modules_to_save copies

Weights are read from safetensors only; pickled ``.bin`` files are never loaded.
"""

from __future__ import annotations

import os
import tempfile
from typing import Mapping

import torch

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
ADAPTER_KEYS = ("poly_lora_A", "poly_lora_B", "poly_router.module_logits")


def adapter_directory(save_directory: str, adapter_name: str) -> str:
    """Where an adapter lives: the directory itself for ``"default"``, else a subfolder named after it."""
    return save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)


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

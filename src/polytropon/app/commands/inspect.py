"""``polytropon inspect``: a saved adapter's config, parameter counts, tasks and routing plot.

It reads the checkpoint files only; no model is loaded.
"""

from __future__ import annotations

import argparse
import os

from ..adapters import read_adapter_config, read_tasks_file_if_present, resolve_adapter_dir
from ..arguments import add_adapter_argument
from ..console import CliError

__all__ = ["VERB", "HELP", "DESCRIPTION", "add_arguments", "run", "count_parameters"]

VERB = "inspect"
HELP = "config, parameter counts, tasks and routing plot of a saved adapter"
DESCRIPTION = "Show a saved adapter's config, parameter counts and tasks, and plot its routing."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``inspect``: an adapter and where to write the routing plot."""
    add_adapter_argument(parser)
    parser.add_argument("--plot", help="where to write the routing PNG (default: <adapter>/routing.png if absent)")


def run(args: argparse.Namespace) -> int:
    """Read config, weights and tasks; print them; plot the routing (if the adapter has a router)."""
    adapter_dir = resolve_adapter_dir(args.adapter)
    config = read_adapter_config(adapter_dir)
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise CliError(f"{adapter_dir}: no adapter_model.safetensors")
    info = read_tasks_file_if_present(adapter_dir)
    counts, n_routers = count_parameters(weights)

    print(f"adapter: {adapter_dir}")
    print("config:")
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    print("parameters:")
    print(f"  adapted layers: {n_routers}")
    for key, value in counts.items():
        print(f"  {key}: {value:,d}")
    print(f"  total: {sum(counts.values()):,d}")
    tasks = info.get("tasks") or getattr(config, "task_names", None) or [f"task {i}" for i in range(config.n_tasks)]
    print(f"tasks ({len(tasks)}): {', '.join(tasks)}")
    if info.get("labels"):
        print(f"labels: {', '.join(info['labels'])}")
    if n_routers:
        show_routing(adapter_dir, tasks, args.plot)
    return 0


def count_parameters(weights: str) -> tuple[dict[str, int], int]:
    """``({"lora_A", "lora_B", "router", "modules_to_save": numbers of values}, number of routers)``
    of an ``adapter_model.safetensors``."""
    from safetensors import safe_open

    counts = {"lora_A": 0, "lora_B": 0, "router": 0, "modules_to_save": 0}
    n_routers = 0
    try:
        with safe_open(weights, framework="pt") as fh:
            for key in fh.keys():
                tensor = fh.get_tensor(key)
                if key.endswith("poly_lora_A"):
                    counts["lora_A"] += tensor.numel()
                elif key.endswith("poly_lora_B"):
                    counts["lora_B"] += tensor.numel()
                elif key.endswith("module_logits"):
                    counts["router"] += tensor.numel()
                    n_routers += 1
                else:
                    counts["modules_to_save"] += tensor.numel()
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CliError(f"{weights}: unreadable ({err})") from None
    return counts, n_routers


def show_routing(adapter_dir: str, tasks: list[str], plot_arg: str | None) -> None:
    """Write the routing plot (``--plot``, or ``<adapter>/routing.png`` unless it exists) and print each task's top skill."""
    from ...toolkit.analysis import allocation_matrix, load_snapshot
    from ..plots import plot_routing_matrix

    try:
        snap = load_snapshot(adapter_dir)
    except (OSError, ValueError) as err:
        raise CliError(f"{adapter_dir}: cannot read the routing ({err})") from None
    matrix = allocation_matrix(snap).numpy()[: len(tasks)]
    plot = plot_arg or os.path.join(adapter_dir, "routing.png")
    if os.path.exists(plot) and plot_arg:
        raise CliError(f"{plot}: exists; refusing to overwrite")
    if not os.path.exists(plot):
        plot_routing_matrix(matrix, tasks, plot, skill_names=[f"skill {i}" for i in range(matrix.shape[1])])
    print(f"routing plot: {plot}")
    top = matrix.argmax(1)
    print("top skill per task: " + ", ".join(f"{t}->{int(s)}" for t, s in zip(tasks, top)))

"""docs/errors.md quotes the messages the code raises.

Each case triggers one error and names the message as the doc writes it (placeholders in ``<angle brackets>``).
The test checks that the doc holds that message as a code span, that the exception has the documented type
(for the command line: exit code 2 and one line on stderr), and that the real message matches the documented
one in full, every placeholder standing for any non-empty text.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from polytropon import (
    PolyConfig, PolyModel, collapse_to_average, freeze_skills, get_peft_model, ibp_loss, param_groups,
)
from polytropon.app import cli
from polytropon.app.data import DataError, load_jsonl, load_rows
from polytropon.toolkit.plots import plot_allocation

from tests.helpers import batch_inputs, randomize_, tiny_llama

DOC_PATH = pathlib.Path(__file__).resolve().parents[2] / "docs" / "errors.md"
PLACEHOLDER = re.compile(r"<[^<>]+>")


def doc_text() -> str:
    return DOC_PATH.read_text(encoding="utf-8")


def pattern_of(documented: str) -> re.Pattern:
    """The documented message as a regex: literal text, each ``<placeholder>`` any non-empty text."""
    return re.compile(".+?".join(re.escape(part) for part in PLACEHOLDER.split(documented)), re.DOTALL)


def check_documented(documented: str, actual: str) -> None:
    assert f"`{documented}`" in doc_text(), f"docs/errors.md does not quote: {documented}"
    assert pattern_of(documented).fullmatch(actual), f"\n  documented: {documented}\n  raised:     {actual}"


# --------------------------------------------------------------------------- a small world to break


def _training():
    from polytropon.toolkit import training

    return training


def llama_poly(**kwargs) -> PolyModel:
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    kwargs.setdefault("n_tasks", 3)
    return get_peft_model(tiny_llama(), PolyConfig(**kwargs))


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    """A tiny model with random non-zero adapter weights, its saved adapter, and damaged copies of it."""
    root = tmp_path_factory.mktemp("errors_doc")
    model = llama_poly()
    randomize_(model)
    good = root / "good"
    model.save_pretrained(str(good))

    def copy(name: str) -> pathlib.Path:
        target = root / name
        shutil.copytree(good, target)
        return target

    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(good / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")

    truncated = copy("truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])

    reshaped = copy("reshaped")
    tensors = load_file(str(reshaped / "adapter_model.safetensors"))
    key = next(k for k in sorted(tensors) if k.endswith("poly_lora_A"))
    tensors[key] = torch.zeros(1, 2, 3)
    save_file(tensors, str(reshaped / "adapter_model.safetensors"))

    shared = llama_poly(router_granularity="model")
    randomize_(shared)
    untied = root / "untied"
    shared.save_pretrained(str(untied))
    tensors = load_file(str(untied / "adapter_model.safetensors"))
    key = [k for k in sorted(tensors) if k.endswith("module_logits")][1]
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(untied / "adapter_model.safetensors"))

    lora = root / "lora"
    model.export_lora(str(lora), 0)

    bad_json = root / "bad_json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{not json", encoding="utf-8")

    a_file = root / "a_file"
    a_file.write_text("x", encoding="utf-8")
    not_empty = root / "not_empty"
    not_empty.mkdir()
    (not_empty / "notes.txt").write_text("x", encoding="utf-8")
    finished = root / "finished"
    finished.mkdir()
    (finished / "run.json").write_text(json.dumps({"format": "polytropon-run", "status": "complete", "args": {}}))
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"task": t, "input": "x y", "target": "yes"}) + "\n" for t in "ab"))
    return SimpleNamespace(root=root, model=model, good=good, pickled=pickled, truncated=truncated,
                           reshaped=reshaped, untied=untied, lora=lora, bad_json=bad_json, a_file=a_file,
                           not_empty=not_empty, finished=finished, rows=rows)


def call(model: PolyModel, **kwargs):
    return model(**batch_inputs("llama", batch=4), **kwargs)


def merged_model() -> PolyModel:
    model = llama_poly()
    model.merge_adapter(1)
    return model


def in_task_context(model: PolyModel, ids) -> None:
    with model.task_context(ids):
        call(model)


def write(path: pathlib.Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def symlinked_save(env) -> None:
    model = llama_poly()
    model.add_adapter("other", PolyConfig(target_modules=["q_proj"]))
    target = env.root / "symlinked"
    target.mkdir()
    os.symlink(env.root, target / "other")
    model.save_pretrained(str(target))


def zero3_save(env) -> None:
    model = llama_poly()
    _, adapter = model.named_adapters()[0]
    adapter.poly_lora_A.ds_shape = (99,)  # a partition's full shape, without DeepSpeed's ds_id: nothing gathers it
    model.save_pretrained(str(env.root / "zero3"))


def named_tasks_model() -> PolyModel:
    return llama_poly(task_names=["qa", "sum", "mt"])


# (id, trigger(env), exception type, the message as docs/errors.md quotes it)
API_CASES = [
    # 1. configuration
    ("config-positive", lambda e: PolyConfig(r=0), ValueError, "PolyConfig.<field> must be a positive integer, got <value>"),
    ("config-int", lambda e: PolyConfig(n_tasks="3"), TypeError, "PolyConfig.<field> must be an int, got <value> (<type>)"),
    ("config-poly-type", lambda e: PolyConfig(poly_type="mixture"), ValueError,
     "PolyConfig.poly_type must be one of ['poly', 'private', 'shared', 'fixed'], got '<value>'"),
    ("config-private", lambda e: PolyConfig(poly_type="private", n_tasks=3, n_skills=2), ValueError,
     "PolyConfig.n_skills must equal n_tasks for poly_type='private' (one skill per task), got n_skills=<n>, n_tasks=<n>"),
    ("config-allocation-zero", lambda e: PolyConfig(poly_type="fixed", n_tasks=1, n_skills=2, allocation=[[0, 0]]), ValueError,
     "PolyConfig.allocation[<task>] is all zeros: every task needs at least one skill"),
    ("config-names-unique", lambda e: PolyConfig(n_tasks=2, task_names=["a", "a"]), ValueError,
     "PolyConfig.task_names must be unique, got duplicates [<names>]"),
    ("config-json", lambda e: PolyConfig.from_pretrained(str(e.bad_json)), ValueError,
     "<dir>/adapter_config.json: not a valid JSON adapter config (<reason>)"),
    ("config-missing", lambda e: PolyConfig.from_pretrained(str(e.root / "nowhere")), FileNotFoundError,
     "<dir>/adapter_config.json: no adapter config found"),
    # 2. wrapping a model
    ("plan-no-match", lambda e: llama_poly(target_modules=["nope"]), ValueError,
     "target_modules=<value> matched no module of <model class> (exclude_modules=<value>)"),
    ("plan-n-splits", lambda e: llama_poly(n_splits=3), ValueError,
     "n_splits=<n> does not divide <in_features or out_features>=<width> of module '<path>': choose n_splits dividing "
     "every adapted layer's input and output widths"),
    ("plan-layer-type", lambda e: llama_poly(target_modules=["embed_tokens"]), TypeError,
     "cannot adapt module '<path>' of type <type>: Poly supports torch.nn.Linear and transformers' Conv1D"),
    # 3. task ids
    ("ids-required", lambda e: call(llama_poly()), ValueError,
     "task_ids are required while adapter '<name>' is active: pass task_ids=... (a LongTensor of shape (batch,) or a "
     "list of ints, one task per example), or route a block of calls with model.task_context(...)"),
    ("ids-dtype", lambda e: call(llama_poly(), task_ids=torch.zeros(4)), TypeError,
     "task_ids must have an integer dtype, got a tensor of dtype <dtype>"),
    ("ids-range", lambda e: call(llama_poly(), task_ids=[0, 3, 0, 0]), ValueError,
     "task id <id> is out of range: the adapter has n_tasks=<n> (ids 0..<n-1>)"),
    ("ids-length", lambda e: call(llama_poly(), task_ids=[0, 1]), ValueError,
     "got <k> task_ids for a batch of <n> examples: expected <n> (one per example) or 1 (one task for the whole batch)"),
    ("ids-context-length", lambda e: in_task_context(llama_poly(), [0, 1]), ValueError,
     "<message above> (task ids of the enclosing model.task_context(...))"),
    ("ids-unknown-name", lambda e: call(named_tasks_model(), task_ids=["qa", "chat", "qa", "qa"]), ValueError,
     "unknown task name '<name>'; known tasks: [<names>]"),
    ("ids-name-without-names", lambda e: call(llama_poly(), task_ids=["qa"]), TypeError,
     "task_id must be an int, got '<name>' (str): the adapter has no task_names; set PolyConfig.task_names (or "
     "polytropon.set_task_names) to refer to tasks by name"),
    ("ids-merged", lambda e: call(merged_model(), task_ids=[0, 1, 1, 1]), ValueError,
     "task <id> is merged into the weights, got task id <id>: call unmerge_adapter() to route other tasks"),
    # 4. adapters
    ("adapter-name", lambda e: e.model.add_adapter("../x", PolyConfig()), ValueError,
     "adapter_name '<name>' is not a valid adapter name: use ASCII letters, digits, '_' and '-', starting with a "
     "letter, digit or '_', at most 128 characters (e.g. 'default', 'task-1', 'lora_v2')"),
    ("adapter-reserved", lambda e: e.model.add_adapter("train", PolyConfig()), ValueError,
     "adapter_name '<name>' is reserved (an attribute of torch.nn.ModuleDict, which holds the adapters): choose another name"),
    ("adapter-unknown", lambda e: e.model.set_adapter("nope"), ValueError, "unknown adapter '<name>'; existing adapters: [<names>]"),
    ("adapter-taken", lambda e: collapse_to_average(e.model, new_adapter_name="default"), ValueError,
     "an adapter named '<name>' already exists"),
    ("merge-switch", lambda e: merged_model().add_adapter("other", PolyConfig(target_modules=["q_proj"])), ValueError,
     "cannot add an adapter while a task is merged: call unmerge_adapter() first"),
    ("merge-range", lambda e: e.model.merge_adapter(7), ValueError,
     "task_id <id> is out of range: adapter '<name>' has n_tasks=<n> (ids 0..<n-1>)"),
    ("merge-type", lambda e: e.model.merge_adapter(1.0), TypeError, "task_id must be an int, got <value> (<type>)"),
    # 5. checkpoints
    ("load-pickled", lambda e: PolyModel.from_pretrained(tiny_llama(), str(e.pickled)), FileNotFoundError,
     "<dir>/adapter_model.safetensors: adapter weights not found (adapter_model.bin is present, but pickled weights "
     "are never loaded)"),
    ("load-truncated", lambda e: PolyModel.from_pretrained(tiny_llama(), str(e.truncated)), ValueError,
     "<dir>/adapter_model.safetensors: not a readable safetensors file (<reason>)"),
    ("load-shape", lambda e: PolyModel.from_pretrained(tiny_llama(), str(e.reshaped)), ValueError,
     "<dir>/adapter_model.safetensors: tensor '<key>' has shape (<shape>), the model expects (<shape>)"),
    ("load-untied", lambda e: PolyModel.from_pretrained(tiny_llama(), str(e.untied)), ValueError,
     "<dir>/adapter_model.safetensors: router_granularity='<granularity>' shares one router between '<key>' and "
     "'<key>', but the checkpoint holds different values for them"),
    ("load-lora", lambda e: PolyModel.from_pretrained(tiny_llama(), str(e.lora)), ValueError,
     "<source>: peft_type is '<type>', expected 'POLY'"),
    ("load-name-taken", lambda e: e.model.load_adapter(str(e.good), "default"), ValueError,
     "an adapter named '<name>' already exists"),
    ("save-symlink", symlinked_save, ValueError,
     "<dir>/<adapter name>: the folder of adapter '<name>' resolves to <path>, outside the save directory <dir>; "
     "nothing is written there"),
    ("export-file", lambda e: e.model.export_lora(str(e.a_file), 0), ValueError, "<dir>: expected a directory, found a file"),
    # 6. export_lora / export_lora_all
    ("export-all-tasks", lambda e: llama_poly().export_lora_all(str(e.root / "loras0"), tasks=[]), ValueError,
     "tasks must be a non-empty list of task ids or names, got <value>"),
    ("export-all-repeat", lambda e: llama_poly().export_lora_all(str(e.root / "loras1"), tasks=[0, 0]), ValueError,
     "tasks to export repeat: [<names>]; give each task once"),
    ("export-all-names", lambda e: llama_poly().export_lora_all(str(e.root / "loras2"), names=["a"]), ValueError,
     "names must be a list of <n> names (one per task of '<adapter>'), got <value>"),
    ("export-all-name-rule", lambda e: llama_poly(task_names=["qa", "sum up", "mt"]).export_lora_all(str(e.root / "loras3")),
     ValueError, "task <id> is named '<name>', which cannot name an exported adapter (a folder and a --lora-modules "
     "name): names need ASCII letters, digits, '_', '-' and '.', starting with a letter, digit or '_', at most 128 "
     "characters; pass names=[...] with one such name per task"),
    ("export-all-not-empty", lambda e: llama_poly().export_lora_all(str(e.not_empty)), ValueError,
     "<dir>: exists and is not an empty directory; an export needs a new or empty one"),
    ("export-all-parent", lambda e: llama_poly().export_lora_all(str(e.root / "no" / "such")), ValueError,
     "<dir>: its parent directory <parent> does not exist"),
    # 7. toolkit
    ("add-tasks-count", lambda e: named_tasks_model().add_tasks(2), ValueError,
     "adapter '<name>' names its tasks ([<names>]): pass the new tasks' names, not a count"),
    ("add-tasks-init", lambda e: llama_poly().add_tasks(1, init=5), ValueError,
     "init task id <id> is out of range: adapter '<name>' has n_tasks=<n>"),
    ("freeze-fixed", lambda e: freeze_skills(llama_poly(poly_type="shared", n_skills=1)), ValueError,
     "adapter '<name>' has a fixed allocation (poly_type='<type>'): with frozen skills nothing would train"),
    ("param-groups", lambda e: param_groups(e.model, lr=-1.0, router_lr=1e-3), ValueError,
     "<lr, router_lr, head_lr, weight_decay or router_weight_decay> must be a non-negative finite number, got <value>"),
    ("ibp-reduction", lambda e: ibp_loss(e.model, reduction="max"), ValueError, "reduction must be 'mean' or 'sum', got '<value>'"),
    ("plot-png", lambda e: plot_allocation(e.model, str(e.root / "plot.jpg")), ValueError, "path must name a .png file, got '<path>'"),
    # 8. training at scale
    ("zero3", zero3_save, ValueError,
     "cannot save <key>: this process holds only a partition of it (shape (<shape>), full shape (<shape>)) and it is "
     "neither an FSDP2 shard nor a DeepSpeed ZeRO-3 parameter, the two kinds save_pretrained gathers"),
    ("state-dict-missing", lambda e: llama_poly().save_pretrained(str(e.root / "sd"), state_dict={}), ValueError,
     "the state_dict given to save_pretrained has no tensor for <key> of adapter '<name>' (looked for [<names>]); "
     "pass the whole model's state dict, or call save_pretrained without state_dict"),
    ("trainer-no-task-ids", lambda e: _training().TaskIdsCollator(lambda f: f)([{"input_ids": [1]}]), ValueError,
     "example <i> of the batch has no 'task_ids' column (it has [<keys>]): give the dataset a 'task_ids' column with "
     "one task id (an int) per example, e.g. dataset.map(lambda ex: {'task_ids': task_to_id[ex['task']]})"),
    ("trainer-list-task-ids", lambda e: _training().TaskIdsCollator(lambda f: f)([{"task_ids": [0, 1]}]), ValueError,
     "example <i> of the batch has <n> task ids in one row: rows packed from several examples would route every token "
     "of the row to one task. Train without packing (SFTConfig(packing=False), padding_free=False), or give each row "
     "the examples of a single task"),
    ("trainer-task-id-type", lambda e: _training().TaskIdsCollator(lambda f: f)([{"task_ids": "qa"}]), TypeError,
     "example <i>: 'task_ids' must be an int, got <value>"),
    ("trainer-packed", lambda e: _training().TaskIdsCollator(lambda f: f)([{"input_ids": [1, 2], "seq_lengths": [1, 1]}]),
     ValueError, "example <i> of the batch is a packed row (<n> sequence(s), 'task_ids' dropped): packing puts examples "
     "of different tasks into one row, whose tokens would all be routed to one task. Train without packing: "
     "SFTConfig(packing=False)"),
    ("trainer-padding-free", lambda e: _training().TaskIdsCollator(lambda f: {"input_ids": torch.zeros(1, 4)})(
        [{"task_ids": 0}, {"task_ids": 1}]), ValueError,
     "the collator made <r> row(s) of <n> examples (padding-free batching puts the examples of a batch into one row): "
     "one task id per example needs one example per row; train with padding_free=False"),
    ("recompute-inputs-bool", lambda e: setattr(e.model, "recompute_inputs", 1), TypeError,
     "recompute_inputs must be a bool, got <value> of type <type>"),
    ("trainer-router-lr", lambda e: _training().PolyTrainer(model=e.model, router_lr=-1), ValueError,
     "router_lr must be a non-negative number or None, got <value>"),
    ("trainer-base", lambda e: _training().poly_trainer_class(dict), TypeError,
     "base must be a transformers.Trainer subclass, got <value>"),
    ("trainer-resume", lambda e: _training().load_checkpoint(e.model, str(e.not_empty)), ValueError,
     "<checkpoint>: not a polytropon checkpoint (neither model.safetensors nor adapter_model.safetensors)"),
    ("trainer-save-state-dict",
     lambda e: e.model.save_pretrained(str(e.root / "from-state-dict"), state_dict={}, is_main_process=True),
     ValueError, "state_dict lacks <n> trainable tensor(s), e.g. '<name>'"),
    # 9. data
    ("data-json", lambda e: load_jsonl(write(e.root / "bad.jsonl", '{"task": "a", "input": "x", "target": "y"}\n{oops\n')),
     DataError, "<file>:<line>: not valid JSON (<reason>)"),
    ("data-key", lambda e: load_jsonl(write(e.root / "short.jsonl", '{"task": "a", "input": "x"}\n')), DataError,
     "<file>:<line>: missing key(s) <keys>"),
    ("data-ending", lambda e: load_rows(write(e.root / "rows.txt", "x")), DataError,
     "<file>: unknown data format '<ending>'; expected one of .csv, .json, .jsonl, .parquet"),
]


@pytest.mark.parametrize("trigger, error, documented", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_documented_error(env, trigger, error, documented):
    with pytest.raises(Exception) as info:
        trigger(env)
    assert type(info.value) is error, f"raised {type(info.value).__name__}: {info.value}"
    check_documented(documented, str(info.value))


def test_errors_leave_the_model_unchanged(env):
    """The doc promises that a refused call changes nothing: the model's outputs and adapters stay as they were."""
    model = env.model
    ids = [0, 1, 2, 0]
    before = call(model, task_ids=ids).logits
    adapters = dict(model.peft_config)
    for name in ("../x", "train", "default"):
        with pytest.raises(ValueError):
            model.add_adapter(name, PolyConfig())
    with pytest.raises(ValueError):
        model.merge_adapter(7)
    with pytest.raises(ValueError):
        model.load_adapter(str(env.reshaped), "other")
    assert model.peft_config == adapters and model.merged_task is None
    assert torch.equal(call(model, task_ids=ids).logits, before)


# --------------------------------------------------------------------------- the command line

# (id, argv(env), the message as docs/errors.md quotes it; without "polytropon" at the start, the message follows
# "polytropon: error: ")
CLI_CASES = [
    ("usage-positive", lambda e: ["train", "--r", "0"],
     "polytropon <verb>: error: argument <flag>: expected a positive integer, got <value> (see --help)"),
    ("usage-unknown-flag", lambda e: ["train", "--bogus"], "polytropon: error: unrecognized arguments: <arguments> (see --help)"),
    ("train-both-targets", lambda e: ["train", "--target-modules", "q", "--target-regex", "q"],
     "give --target-modules or --target-regex, not both"),
    ("train-eval-data", lambda e: ["train", "--eval-data", str(e.rows), "--output-dir", str(e.root / "run1")],
     "--eval-data needs --data"),
    ("train-eval-fraction", lambda e: ["train", "--data", str(e.rows), "--model", str(e.root), "--eval-fraction", "1.5",
                                       "--output-dir", str(e.root / "run2")],
     "--eval-fraction must be in (0, 1), got <value>"),
    ("claims-single-run-flag", lambda e: ["train", "--lr", "0.1", "--output-dir", str(e.root / "run5")],
     "<flag>: the default run measures the claims with each method's searched recipe "
     "(polytropon.app.defaults.CLAIMS_RUN); add --seed N for one run with your own settings"),
    ("claims-seeds", lambda e: ["train", "--seeds", "0,zero", "--output-dir", str(e.root / "run6")],
     "--seeds must be comma-separated integers, got <text>"),
    ("run-is-file", lambda e: ["train", "--output-dir", str(e.a_file)], "<dir>: exists and is not a directory"),
    ("run-not-empty", lambda e: ["train", "--output-dir", str(e.not_empty)],
     "<dir>: exists, is not empty and is not a polytropon run; refusing to write there"),
    ("run-exists", lambda e: ["train", "--output-dir", str(e.finished)],
     "<dir>: holds a polytropon run; pass --resume to continue it or choose another --output-dir"),
    ("resume-nothing", lambda e: ["train", "--resume", "--output-dir", str(e.not_empty)],
     "<dir>: no polytropon run to resume (no run.json)"),
    ("resume-complete", lambda e: ["train", "--resume", "--output-dir", str(e.finished)],
     "<dir>: the run is already complete; choose another --output-dir"),
    ("model-missing", lambda e: ["train", "--data", str(e.rows), "--model", str(e.root / "no_model"),
                                 "--output-dir", str(e.root / "run3")], "<model>: no such model folder"),
    ("data-missing", lambda e: ["train", "--data", str(e.root / "none.jsonl"), "--output-dir", str(e.root / "run4")],
     "<file>: no such file"),
    ("adapter-none", lambda e: ["eval", str(e.not_empty), "--data", str(e.rows)],
     "<path>: no adapter here (no adapter_config.json in it or in adapter/)"),
    ("eval-no-tasks-file", lambda e: ["eval", str(e.good), "--data", str(e.rows)],
     "<dir>: no polytropon_tasks.json (task names are needed to map tasks to router rows)"),
    ("export-unknown-task", lambda e: ["export-lora", str(e.good), "--task", "chat", "--output", str(e.root / "x")],
     "unknown task '<task>'; tasks: <tasks>"),
    ("export-task-range", lambda e: ["export-lora", str(e.good), "--task", "9", "--output", str(e.root / "x")],
     "task id <id> is out of range: the adapter has <n> tasks (0..<n-1>)"),
    ("export-all-or-task", lambda e: ["export-lora", str(e.good), "--output", str(e.root / "x")],
     "polytropon export-lora: error: one of the arguments --task --all-tasks is required (see --help)"),
    ("export-all-and-task", lambda e: ["export-lora", str(e.good), "--task", "0", "--all-tasks", "--output", str(e.root / "x")],
     "polytropon export-lora: error: argument --all-tasks: not allowed with argument --task (see --help)"),
    ("export-output", lambda e: ["merge", str(e.good), "--task", "0", "--output", str(e.not_empty)],
     "<dir>: exists and is not an empty directory; refusing to overwrite"),
]


@pytest.mark.parametrize("argv, documented", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_documented_cli_error(env, capsys, argv, documented):
    code = cli.main(argv(env))
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    if not documented.startswith("polytropon"):
        prefix = "polytropon: error: "
        assert line.startswith(prefix), line
        line = line[len(prefix):]
    check_documented(documented, line)


def test_exit_codes(monkeypatch, capsys):
    """Ctrl-C exits with 130 and one line; an unexpected exception is not swallowed (Python exits with 1)."""
    from polytropon.app.commands import suite

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(suite, "run", interrupted)
    assert cli.main(["suite", "anywhere"]) == 130
    assert capsys.readouterr().err.strip() == "polytropon: interrupted"
    assert "| 130 | interrupted with Ctrl-C: `polytropon: interrupted` |" in doc_text()

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(suite, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["suite", "anywhere"])
    assert cli.main(["--help"]) == 0
    assert cli.EXIT_BAD_INPUT == 2 and cli.EXIT_INTERRUPTED == 130


def test_every_command_line_error_is_documented():
    """Every one-line message of the command line (CliError, DataError, ModelLoadError) is in docs/errors.md.

    The literal parts of each message (between its ``{...}`` fields) must appear in the doc, so a new check in
    ``polytropon.app`` fails this test until its message is documented.
    """
    import polytropon.app as app

    doc = doc_text()
    root = pathlib.Path(app.__file__).parent
    call_re = re.compile(r"raise (?:CliError|DataError|ModelLoadError)\(\s*f?\"([^\"]+)\"")
    messages = []
    for path in sorted(root.rglob("*.py")):
        messages += [(path.name, m) for m in call_re.findall(path.read_text(encoding="utf-8"))]
    assert len(messages) >= 50, len(messages)
    undocumented = []
    for where, message in messages:
        fragments = [f for f in re.split(r"\{[^{}]*\}", message) if len(f.strip(" :;,.'()")) >= 4]
        if not all(f in doc for f in fragments):
            undocumented.append(f"{where}: {message}")
    assert not undocumented, "messages missing from docs/errors.md:\n" + "\n".join(undocumented)

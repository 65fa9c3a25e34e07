"""`slimtune compare SPEC.yaml`: methods x tasks x seeds through the normal `train` path, one run directory per
cell, and a table of means with standard errors over the seeds (``compare_table.py``).

A spec names the model, the tasks, the seeds and the methods (each a shipped or own config file, with optional
``set:`` overrides), plus overrides every cell gets (equal steps and batch for all). Each cell is an ordinary
`slimtune train` run in a process of its own under ``OUTPUT_DIR/runs/<label>-<task>-s<seed>``, scored on the
task's **full** held-out set; the base model is scored once per task (``OUTPUT_DIR/base/<task>.json``).

A workflow method (PEMA: its own command and training loop) takes part through its recipe's ``compare_cell``: its
steps run in order on the cell's config, which gets the cell's model, task, seed (the method's own seed key) and
run directory, the spec's ``data.*`` and ``model.*`` overrides, but no ``train.*`` ones (its loop has its own
epochs and batches), and the recipe writes the cell's ``results.json`` in a trainer run's shape.

A killed comparison continues where it stopped: a finished cell (``results.json``) is read, not re-run; a cell
with a checkpoint resumes from it (`train --resume`); a cell that left files but no checkpoint is moved aside
(``<cell>.incomplete-N``: nothing is deleted) and starts again (a workflow cell always starts again).
``compare.json``, ``compare.md`` and ``compare.png`` are rewritten after every cell, so a long comparison can be
committed as it goes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from slimtune.core.errors import UserError
from slimtune.core.files import write_atomic
from slimtune.methods import METHODS, WORKFLOW, baseline_of, get_spec
from slimtune.training import config as C

SPEC_KEYS = ("model", "tasks", "seeds", "methods", "set", "output_dir")
ENTRY_KEYS = ("config", "set", "label", "tasks")
EVERY_CELL = [
    "data.eval_size=null",
    "data.seed=0",
    "train.eval_every=0",
    "train.eval_before=false",
    "train.num_generations=1",
]
"""What every cell gets: the full held-out set of one fixed split (the seed varies the run, not the data),
evaluated once, after training (the base model is scored once per task instead of before every run)."""


@dataclass
class Entry:
    """One method of the comparison: its config file and the overrides it adds."""

    label: str
    config: Path
    overrides: list[str]
    method: str
    tasks: list[str] | None = None
    """The spec's tasks this method runs on (None: all)."""

    @property
    def workflow(self) -> bool:
        return get_spec(self.method).kind == WORKFLOW


@dataclass
class Cell:
    entry: Entry
    task: str
    seed: int
    out: Path

    @property
    def name(self) -> str:
        return f"{self.entry.label}-{self.task}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.out / "runs" / self.name

    @property
    def config_path(self) -> Path:
        return self.out / "cells" / f"{self.name}.yaml"


@dataclass
class Comparison:
    model: str
    tasks: list[str]
    seeds: list[int]
    out: Path
    every: list[str]
    """Overrides every cell gets (the spec's ``set``)."""
    entries: list[Entry] = field(default_factory=list)

    def cells(self) -> list[Cell]:
        """Every method at one seed before the next seed, so a partial table already covers every method."""
        return [
            Cell(e, t, s, self.out)
            for s in self.seeds
            for t in self.tasks
            for e in self.entries
            if e.tasks is None or t in e.tasks
        ]

    def cell_raw(self, cell: Cell) -> dict:
        """The cell's config as written: the entry's file with the spec's, the entry's and the cell's overrides."""
        seed_key = get_spec(cell.entry.method).instead.get("seed", "train.seed")  # a workflow's own seed
        where = [f"model.name={self.model}", f"data.task={cell.task}", f"{seed_key}={cell.seed}"]
        every = [*self.every, *cell.entry.overrides, *where, *EVERY_CELL, f"train.output_dir={cell.run_dir}"]
        if cell.entry.workflow:  # its own loop: the trainer's settings do not apply
            every = [o for o in every if not o.startswith("train.") or o.startswith("train.output_dir=")]
        return C.merge(C.read_yaml(cell.entry.config), C.parse_overrides(every))

    def cell_config(self, cell: Cell) -> C.RunConfig:
        return C.from_dict(self.cell_raw(cell))

    def baseline(self, entry: Entry) -> Entry | None:
        """The entry of ``entry``'s baseline method (its own where it is one), or None where the spec has none."""
        want = baseline_of(entry.method)
        return next((e for e in self.entries if e.method == want and not e.overrides), None) or next(
            (e for e in self.entries if e.method == want), None
        )


def _fail(path: Path, key: str, msg: str) -> UserError:
    return UserError(f"{path}: {key}: {msg}")


def _strings(path: Path, key: str, value, empty_ok: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not (value or empty_ok):
        raise _fail(path, key, "expected a list of strings")
    return value


def _entry(path: Path, i: int, raw, every: list[str]) -> Entry:
    raw = {"config": raw} if isinstance(raw, str) else raw
    key = f"methods[{i}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), str):
        raise _fail(path, key, "expected a config path, or a mapping with config: (and set:, label:)")
    unknown = sorted(set(raw) - set(ENTRY_KEYS))
    if unknown:
        raise _fail(path, key, f"unknown key(s) {', '.join(unknown)} (known: {', '.join(ENTRY_KEYS)})")
    config = Path(raw["config"])
    if not config.is_file() and (path.parent / config).is_file():
        config = (
            path.parent / config
        )  # relative to the spec where it is not relative to the working directory
    if not config.is_file():
        raise _fail(path, f"{key}.config", f"'{raw['config']}': no such file")
    overrides = _strings(path, f"{key}.set", raw.get("set", []), empty_ok=True)
    tasks = _strings(path, f"{key}.tasks", raw["tasks"]) if "tasks" in raw else None
    raw_method = C.read_yaml(config).get("method")
    method = raw_method.get("name") if isinstance(raw_method, dict) else None
    if method is not None and method in METHODS and get_spec(method).kind == WORKFLOW:
        if not hasattr(_recipe(method), "compare_cell"):
            raise _fail(path, key, f"{method} has no comparison cell; compare it apart")
    else:  # a trainer's config, with every override (a bad key or value fails here)
        method = C.load_config(config, [*every, *overrides]).method.name
    return Entry(str(raw.get("label") or method), config, overrides, method, tasks)


def _recipe(method: str):
    import importlib

    return importlib.import_module(get_spec(method).recipe)


def load_spec(path: str | Path, out: str | Path | None = None) -> Comparison:
    """Read and check the spec and every cell's config before anything runs (one line naming the key)."""
    path = Path(path)
    raw = C.read_yaml(path)
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise _fail(path, ", ".join(unknown), f"unknown key (known: {', '.join(SPEC_KEYS)})")
    for key in ("model", "tasks", "methods"):
        if key not in raw:
            raise _fail(path, key, "missing")
    seeds = raw.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or any(type(s) is not int for s in seeds):
        raise _fail(path, "seeds", "expected a list of integers")
    if len(set(seeds)) < len(seeds):
        raise _fail(path, "seeds", f"{seeds} repeats a seed")
    if not isinstance(raw["methods"], list) or not raw["methods"]:
        raise _fail(path, "methods", "expected a list of config files")
    every = _strings(path, "set", raw.get("set", []), empty_ok=True)
    out_dir = Path(out or raw.get("output_dir") or f"compare-{path.stem}")
    comp = Comparison(str(raw["model"]), _strings(path, "tasks", raw["tasks"]), seeds, out_dir, every)
    comp.entries = [_entry(path, i, e, every) for i, e in enumerate(raw["methods"])]
    labels = [e.label for e in comp.entries]
    twice = sorted({lbl for lbl in labels if labels.count(lbl) > 1})
    if twice:
        raise _fail(path, "methods", f"two entries labelled {twice[0]!r}: give one a label:")
    for i, e in enumerate(comp.entries):
        other = sorted(set(e.tasks or []) - set(comp.tasks))
        if other:
            raise _fail(path, f"methods[{i}].tasks", f"{other[0]!r} is not one of the spec's tasks")
    for cell in comp.cells():
        comp.cell_config(cell)  # every cell's config is checked before the first runs
    return comp


# ---------------------------------------------------------------- running


def _cli(args: list[str], log: Path) -> int:
    """``slimtune ARGS`` in a process of its own (its memory and its failure are its own), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as f:
        f.write(f"\n$ slimtune {' '.join(args)}\n")
        f.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.run(
            [sys.executable, "-m", "slimtune.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env
        ).returncode


def _set_aside(run_dir: Path) -> Path:
    n = 1
    while run_dir.with_name(f"{run_dir.name}.incomplete-{n}").exists():
        n += 1
    aside = run_dir.with_name(f"{run_dir.name}.incomplete-{n}")
    run_dir.rename(aside)
    return aside


def run_cell(comp: Comparison, cell: Cell, say=print) -> str:
    """Run (or resume, or read) one cell: 'done' (already), 'ran', 'resumed' or 'failed (exit N, see LOG)'."""
    if (cell.run_dir / "results.json").is_file():
        return "done"
    log = comp.out / "logs" / f"{cell.name}.log"
    if cell.entry.workflow:
        return _run_workflow_cell(comp, cell, log, say)
    if (cell.run_dir / "checkpoint").is_dir():
        code, how = _cli(["train", "--resume", str(cell.run_dir)], log), "resumed"
    else:
        if cell.run_dir.exists() and any(cell.run_dir.iterdir()):
            say(
                f"compare: {cell.name}: no checkpoint in what a stopped run left; moved to {_set_aside(cell.run_dir)}"
            )
        cell.config_path.parent.mkdir(parents=True, exist_ok=True)
        C.save_config(comp.cell_config(cell), cell.config_path)
        code, how = _cli(["train", str(cell.config_path)], log), "ran"
    return _status(cell, code, how, log)


def _status(cell: Cell, code: int, how: str, log: Path) -> str:
    """``how`` when the cell's process succeeded and left its results.json, else why not."""
    ok = code == 0 and (cell.run_dir / "results.json").is_file()
    return how if ok else f"failed (exit {code}, see {log})"


def _run_workflow_cell(comp: Comparison, cell: Cell, log: Path, say) -> str:
    """A workflow method's cell: its recipe's steps from the start (what a stopped one left is moved aside)."""
    if cell.run_dir.exists() and any(cell.run_dir.iterdir()):
        say(f"compare: {cell.name}: a stopped run's files moved to {_set_aside(cell.run_dir)}")
    cell.config_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cell.config_path, yaml.safe_dump(comp.cell_raw(cell), sort_keys=False))  # only what it sets
    code = _recipe(cell.entry.method).compare_cell(
        cell.config_path, cell.run_dir, lambda args: _cli(args, log)
    )
    return _status(cell, code, "ran", log)


def run_base(comp: Comparison, task: str) -> str:
    """The base model on ``task``'s full held-out set, once per task."""
    out = comp.out / "base" / f"{task}.json"
    if out.is_file():
        return "done"
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [
        "eval",
        "--model",
        comp.model,
        "--task",
        task,
        "--eval-size",
        "all",
        "--samples",
        "0",
        "--json",
        str(out),
    ]
    code = _cli(args, comp.out / "logs" / f"base-{task}.log")
    return "ran" if code == 0 and out.is_file() else f"failed (exit {code})"


def compare(spec_path: str | Path, out: str | Path | None = None, say=print) -> tuple[Path, list[str]]:
    """Run every cell not yet finished, rewriting the table after each; returns ``compare.md`` and the names
    of the runs that failed (run the comparison again to retry them)."""
    from slimtune.recipes import compare_table

    comp = load_spec(spec_path, out)
    comp.out.mkdir(parents=True, exist_ok=True)
    cells = comp.cells()
    runs = (
        f"{len(comp.entries)} methods x {len(comp.tasks)} tasks x {len(comp.seeds)} seeds = {len(cells)} runs"
    )
    say(f"compare: {runs} on {comp.model}, in {comp.out}")
    failed = []
    for task in comp.tasks:
        status = run_base(comp, task)
        say(f"compare: base-{task}: {status}")
        failed += [f"base-{task}"] if status.startswith("failed") else []
    for i, cell in enumerate(cells, 1):
        status = run_cell(comp, cell, say)
        say(f"compare: [{i}/{len(cells)}] {cell.name}: {status}")
        failed += [cell.name] if status.startswith("failed") else []
        compare_table.write(comp)
    return compare_table.write(comp), failed

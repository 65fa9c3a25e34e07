"""The table of a comparison (``compare.py``): per method and task, the mean and standard error over the seeds of
the task metric on the full held-out set, eval loss, training wall time and peak memory; the base model's score;
each method's difference from its baseline (LoRA for the adapter methods, QLoRA for QST, full for SAT: the
registry's ``baseline``) and whether it lies outside two standard errors. Written as ``compare.json``,
``compare.md`` and ``compare.png``."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from slimtune.core.files import read_json, write_atomic
from slimtune.data.tasks import get_task


@dataclass
class Stat:
    mean: float
    se: float | None
    """Standard error of the mean over the seeds (stdev / sqrt(n)); None with one seed."""
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat | None:
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return None
        se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
        return cls(statistics.fmean(values), se, len(values))


@dataclass
class Row:
    label: str
    method: str
    task: str
    metric: str
    score: Stat | None
    eval_loss: Stat | None
    train_s: Stat | None
    peak_gb: Stat | None
    seeds_done: list[int]
    examples: int | None
    baseline: str | None = None
    vs_baseline: float | None = None
    """score minus the baseline's score (None for a baseline itself or where it is missing)."""
    se_diff: float | None = None
    outside_2se: bool | None = None
    vs_base_model: float | None = None
    above_base_2se: bool | None = None


def _results(cell) -> dict | None:
    path = cell.run_dir / "results.json"
    return read_json(path) if path.is_file() else None


def base_scores(comp) -> dict[str, dict]:
    """task -> the base model's eval summary (``base/<task>.json``), for the tasks scored so far."""
    out = {}
    for task in comp.tasks:
        path = comp.out / "base" / f"{task}.json"
        if path.is_file():
            out[task] = read_json(path)
    return out


def rows(comp) -> list[Row]:
    """One row per (method entry, task), over the seeds finished so far, with baseline and base-model columns."""
    by_key: dict[tuple[str, str], Row] = {}
    finished = [(c, r) for c in comp.cells() if (r := _results(c))]  # each results.json read once
    for entry in comp.entries:
        for task in comp.tasks:
            metric = get_task(task).metric_name
            done = [(c.seed, r) for c, r in finished if c.entry is entry and c.task == task]
            after = [r["after"] for _, r in done]
            by_key[entry.label, task] = Row(
                entry.label,
                entry.method,
                task,
                metric,
                Stat.of([a.get(metric) for a in after]),
                Stat.of([a.get("eval_loss") for a in after]),
                Stat.of([r.get("train_wall_s") for _, r in done]),
                Stat.of([r["peak_bytes"] / 2**30 for _, r in done if r.get("peak_bytes")]),
                [s for s, _ in done],
                after[0].get("examples") if after else None,
            )
    base = base_scores(comp)
    for (label, task), row in by_key.items():
        entry = next(e for e in comp.entries if e.label == label)
        ref = comp.baseline(entry)
        if ref is not None and ref.label != label:
            row.baseline = ref.label
            other = by_key[ref.label, task]
            if row.score and other.score:
                row.vs_baseline = row.score.mean - other.score.mean
                row.se_diff = math.sqrt(_sq(row.score.se) + _sq(other.score.se))
                row.outside_2se = abs(row.vs_baseline) > 2 * row.se_diff if row.se_diff > 0 else None
        if row.score and task in base and base[task].get(row.metric) is not None:
            row.vs_base_model = row.score.mean - base[task][row.metric]
            se = row.score.se
            row.above_base_2se = row.vs_base_model > 2 * se if se else None
    return list(by_key.values())


def _sq(x: float | None) -> float:
    return 0.0 if x is None else x * x  # one seed: no spread known


def _pm(stat: Stat | None, spec: str = ".3f") -> str:
    if stat is None:
        return "—"
    return f"{stat.mean:{spec}}" + ("" if stat.se is None else f" ± {stat.se:{spec}}")


def _yes(flag: bool | None) -> str:
    return "—" if flag is None else ("yes" if flag else "no")


def markdown(comp, table: list[Row]) -> str:
    base = base_scores(comp)
    lines = [
        f"# Comparison on {comp.model}",
        "",
        f"Seeds {', '.join(map(str, comp.seeds))}; each cell a `slimtune train` run under `runs/`, scored on the "
        "task's full held-out set. Mean ± standard error over the finished seeds (n); Δ: the difference from the "
        "baseline's mean, with the standard error of the difference; *outside 2 SE*: |Δ| > 2 SE.",
        "",
    ]
    for task in comp.tasks:
        metric = get_task(task).metric_name
        b = base.get(task, {})
        score = f"{b[metric]:.3f} ({b.get('examples', '?')} examples)" if metric in b else "not scored yet"
        lines += [f"## {task} ({metric})", "", f"Base model: {score}.", ""]
        lines += [
            f"| method | n | {metric} | vs base | eval loss | train s | peak GiB | baseline | Δ vs baseline | outside 2 SE |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in table if r.task == task):
            delta = "—" if r.vs_baseline is None else f"{r.vs_baseline:+.3f} ± {r.se_diff:.3f}"
            vs_base = "—" if r.vs_base_model is None else f"{r.vs_base_model:+.3f}"
            lines.append(
                f"| {r.label} | {len(r.seeds_done)} | {_pm(r.score)} | {vs_base} | {_pm(r.eval_loss)} | "
                f"{_pm(r.train_s, '.0f')} | {_pm(r.peak_gb, '.2f')} | {r.baseline or '(itself)'} | {delta} | "
                f"{_yes(r.outside_2se)} |"
            )
        lines.append("")
    return "\n".join(lines)


def chart(comp, table: list[Row], out: Path) -> Path | None:
    """Bars of each method's mean score with its standard error, the base model as a line; one panel a task."""
    if not any(r.score for r in table):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = base_scores(comp)
    fig, axes = plt.subplots(1, len(comp.tasks), figsize=(4.5 * len(comp.tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], comp.tasks):
        here = [r for r in table if r.task == task and r.score]
        ax.bar(
            range(len(here)),
            [r.score.mean for r in here],
            yerr=[_sq(r.score.se) ** 0.5 for r in here],
            capsize=3,
        )
        ax.set_xticks(range(len(here)), [r.label for r in here], rotation=30, ha="right")
        metric = get_task(task).metric_name
        if metric in base.get(task, {}):
            ax.axhline(base[task][metric], color="gray", linestyle="--", label="base model")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{task} ({metric})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write(comp) -> Path:
    """Rewrite ``compare.json``, ``compare.md`` and ``compare.png`` from the cells finished so far."""
    table = rows(comp)
    doc = {
        "model": comp.model,
        "tasks": comp.tasks,
        "seeds": comp.seeds,
        "base": base_scores(comp),
        "rows": [asdict(r) for r in table],
        "cells": [
            {"name": c.name, "run_dir": str(c.run_dir), "done": (c.run_dir / "results.json").is_file()}
            for c in comp.cells()
        ],
    }
    write_atomic(comp.out / "compare.json", json.dumps(doc, indent=2, default=str))
    md = comp.out / "compare.md"
    write_atomic(md, markdown(comp, table))
    chart(comp, table, comp.out / "compare.png")
    return md

"""`slimtune report RUN [RUN ...]`: curves of one or more runs side by side (PNG, matplotlib) and a Markdown summary.

Everything comes from what a run writes: ``logs/train.jsonl`` (one record per logged step and per evaluation),
``results.json`` (before/after evaluation, wall time, memory; absent while a run is unfinished) and
``config.yaml``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from slimtune.core.errors import UserError
from slimtune.core.files import read_json, write_atomic

# (file stem, title, y label, the train.jsonl key, scale)
PLOTS = (
    ("loss", "Training loss", "loss", "loss", 1.0),
    ("eval_loss", "Evaluation loss", "eval loss", "eval/eval_loss", 1.0),
    ("lr", "Learning rate", "learning rate", "lr", 1.0),
    ("tokens_per_s", "Throughput", "tokens / s", "tokens_per_s", 1.0),
    ("memory", "Peak memory", "GB", "peak_bytes", 1e-9),
)


@dataclass
class Run:
    path: Path
    label: str
    records: list[dict]
    results: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
        return [s for s, _ in pts], [v for _, v in pts]


def read_run(path: Path) -> Run:
    """A run directory's logs, results and config; one :class:`UserError` naming what is missing or damaged."""
    log = path / "logs" / "train.jsonl"
    if not log.is_file():
        raise UserError(
            f"report: '{path}' has no logs/train.jsonl (not a slimtune run directory, or not started)"
        )
    records = []
    for n, line in enumerate(log.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"report: '{log}' line {n}: invalid JSON ({err.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise UserError(f"report: '{log}' line {n}: not a record with an integer 'step'")
        records.append(rec)
    results = read_json(path / "results.json") if (path / "results.json").is_file() else {}
    config = {}
    if (path / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    return Run(path, path.name, records, results, config)


def _labels(runs: list[Run]) -> None:
    """Directory names, with the parent's where two runs share one."""
    names = [r.path.name for r in runs]
    for r in runs:
        if names.count(r.path.name) > 1:
            r.label = f"{r.path.parent.name}/{r.path.name}"


def plot(runs: list[Run], out: Path) -> list[str]:
    """One PNG per metric any run logged, every run on it; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for stem, title, ylabel, key, scale in PLOTS:
        lines = [(r.label, *r.series(key)) for r in runs]
        if not any(xs for _, xs, _ in lines):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, xs, ys in lines:
            if xs:
                ax.plot(xs, [y * scale for y in ys], marker="o" if len(xs) < 12 else None, label=label)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=110)
        plt.close(fig)
        written.append(f"{stem}.png")
    return written


def _fmt(value, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "–"


def summary(runs: list[Run], images: list[str]) -> str:
    """The Markdown comparison: one row per run, then the metrics after training, then the curves."""
    lines = [
        "# slimtune report",
        "",
        f"{len(runs)} run(s): " + ", ".join(f"`{r.path}`" for r in runs),
        "",
        "| run | method | model | task | steps | train loss first → last | eval loss before → after | "
        "train wall | tokens/s | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        res, cfg = r.results, r.config
        losses = r.series("loss")[1]
        tps = r.series("tokens_per_s")[1]
        mem = res.get("peak_bytes") or max(r.series("peak_bytes")[1], default=None)
        before, after = res.get("before", {}), res.get("after", {})
        lines.append(
            f"| {r.label} | {res.get('method') or cfg.get('method', {}).get('name', '–')} "
            f"| {res.get('model') or cfg.get('model', {}).get('name', '–')} "
            f"| {res.get('task') or cfg.get('data', {}).get('task') or '–'} "
            f"| {res.get('steps', max((x['step'] for x in r.records), default=0))} "
            f"| {_fmt(losses[0] if losses else None)} → {_fmt(losses[-1] if losses else None)} "
            f"| {_fmt(before.get('eval_loss'))} → {_fmt(after.get('eval_loss'))} "
            f"| {_fmt(res.get('train_wall_s'), '.1f')} s | {_fmt(sum(tps) / len(tps) if tps else None, '.0f')} "
            f"| {_fmt(mem / 1e9 if mem else None, '.2f')} GB |"
        )
    metrics = sorted(
        {k for r in runs for k in r.results.get("after", {}) if k not in ("eval_loss", "examples")}
    )
    if metrics:
        lines += [
            "",
            "After training:",
            "",
            "| run | " + " | ".join(metrics) + " |",
            "|---" * (len(metrics) + 1) + "|",
        ]
        for r in runs:
            after = r.results.get("after", {})
            lines.append(f"| {r.label} | " + " | ".join(_fmt(after.get(m)) for m in metrics) + " |")
    unfinished = [r.label for r in runs if not r.results]
    if unfinished:
        lines += ["", f"No results.json yet (unfinished or stopped): {', '.join(unfinished)}."]
    lines += [""] + [f"![{name[:-4]}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the PNGs and ``report.md`` for ``run_dirs`` into ``out`` (default: ``<run>/report`` for one run,
    ``report-<time>`` for several); an existing non-empty ``out`` is refused, not overwritten."""
    if not run_dirs:
        raise UserError("report: give at least one RUN_DIR")
    runs = [read_run(Path(p)) for p in run_dirs]
    _labels(runs)
    if out is None:
        out = runs[0].path / "report" if len(runs) == 1 else Path(time.strftime("report-%Y%m%d-%H%M%S"))
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise UserError(f"report: '{out}' already exists; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    images = plot(runs, out)
    write_atomic(out / "report.md", summary(runs, images))
    return out / "report.md"

"""Where a run's metrics go: ``logs/train.jsonl`` (always: the run's own record, read by `slimtune report`) and
the experiment trackers of ``train.report_to`` through accelerate's tracker classes.

Offline by default, like the rest of slimtune: W&B runs in offline mode (its files under ``logs/wandb``; `wandb
sync` uploads them later) unless ``WANDB_MODE`` says otherwise, and MLflow writes a local file store under
``logs/mlruns`` unless ``MLFLOW_TRACKING_URI`` names a server.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

TRACKERS = ("tensorboard", "wandb", "mlflow", "jsonl")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PROJECT = "slimtune"


def check(report_to: list[str]) -> list[tuple[str, str]]:
    """Config problems of ``train.report_to``: unknown names, or a tracker whose package is not installed."""
    out = []
    for name in report_to:
        if name not in TRACKERS:
            out.append(("report_to", f"{name!r} is not one of {', '.join(TRACKERS)}"))
        elif name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None:
            out.append(
                (
                    "report_to",
                    f"{name!r} needs the {PACKAGES[name]} package: pip install 'slimtune[trackers]'",
                )
            )
    return out


def _make(name: str, logs: Path, run_name: str, env: dict[str, str]):
    """An accelerate tracker writing under ``logs``; environment variables it needs set go into ``env`` (the
    caller sets them for the run and removes them after)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if name == "tensorboard":
        return TensorBoardTracker("tensorboard", logs)
    if name == "wandb":
        (logs / "wandb").mkdir(parents=True, exist_ok=True)
        return WandBTracker(
            PROJECT, dir=str(logs), name=run_name, mode=os.environ.get("WANDB_MODE", "offline")
        )
    if "MLFLOW_TRACKING_URI" not in os.environ:  # a local file store (MLflow 3 asks for an explicit opt-in)
        env["MLFLOW_TRACKING_URI"] = (logs / "mlruns").resolve().as_uri()
        if "MLFLOW_ALLOW_FILE_STORE" not in os.environ:
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return MLflowTracker(experiment_name=PROJECT, logging_dir=str(logs / "mlruns"), run_name=run_name)


class RunLog:
    """The main process's metric log of one run. ``config``: the run's settings, stored with each tracker."""

    def __init__(self, run_dir: Path, report_to: list[str], config: dict | None = None, main: bool = True):
        self.logs = Path(run_dir) / "logs"
        self.names = [n for n in dict.fromkeys(report_to) if n != "jsonl"]
        self.config = config or {}
        self.main = main
        self._trackers: list | None = None
        self._env: dict[str, str] = {}  # variables this run set (removed again at close)

    def _start(self) -> list:
        if self._trackers is None:
            self.logs.mkdir(parents=True, exist_ok=True)
            self._trackers = []
            for name in self.names:
                tracker = _make(name, self.logs, self.logs.parent.name, self._env)
                os.environ.update(self._env)
                tracker.start()
                tracker.store_init_configuration(_flat(self.config))
                self._trackers.append(tracker)
        return self._trackers

    def log(self, record: dict) -> None:
        """One record (``step`` plus metrics): a line of train.jsonl, the finite numbers to every tracker."""
        if not self.main:
            return
        trackers = self._start()
        with (self.logs / "train.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        numbers = {
            k: v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        for tracker in trackers:
            tracker.log(numbers, step=record["step"])

    def close(self) -> None:
        for tracker in self._trackers or []:
            tracker.finish()
        self._trackers = None
        for key in self._env:
            os.environ.pop(key, None)
        self._env = {}


def _flat(config: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": ...}}`` → ``{"train.lr": ...}`` with plain values (what every tracker stores)."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


@dataclass
class TrainResult:
    """A run's training, over all its processes when it was resumed (``StepProgress.state`` carries the totals
    through each checkpoint)."""

    steps: int
    train_s: float
    tokens: int
    first_loss: float
    last_loss: float
    peak_bytes: int
    peak_bytes_per_rank: list[int] = field(default_factory=list)
    evals: dict[int, dict] = field(default_factory=dict)


class StepProgress:
    """The progress bar of a run (main process) and its per-step record in the run log every ``log_every``
    steps and at the last; the run's first and last loss, tokens, training time and peak, for the result —
    continued from ``restored`` (a checkpoint's :meth:`state`) when the run resumes, so a resumed run reports
    the whole run."""

    def __init__(
        self,
        run_log: RunLog,
        total: int,
        initial: int,
        log_every: int,
        main: bool,
        restored: dict | None = None,
    ):
        from tqdm.auto import tqdm

        self.run_log, self.total, self.log_every = run_log, total, log_every
        self.bar = tqdm(total=total, initial=initial, desc="train", disable=not main, dynamic_ncols=True)
        r = restored or {}
        self.first_loss, self.last_loss = r.get("first_loss", math.nan), r.get("last_loss", math.nan)
        self.tokens, self.peak, self.prior_s = (
            r.get("tokens", 0),
            r.get("peak_bytes", 0),
            r.get("train_s", 0.0),
        )
        self.t_start = time.perf_counter()

    def elapsed(self) -> float:
        """Training time so far: the earlier processes' (through the checkpoint this one resumed) and this one's."""
        return self.prior_s + time.perf_counter() - self.t_start

    def state(self) -> dict:
        """The totals through the current step, for a checkpoint."""
        return {
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "tokens": self.tokens,
            "peak_bytes": self.peak,
            "train_s": self.elapsed(),
        }

    def step(
        self, step: int, loss: float, tokens: int, dt: float, peak: int, extra: dict, method: dict
    ) -> None:
        """``extra``: more of the step's record (learning rate, gradient norm); ``method``: the method's
        ``extra_state``, whose numbers are logged as ``method/<key>`` (e.g. SAT's current omission rate)."""
        from slimtune.core.memory import fmt_bytes

        self.first_loss = loss if math.isnan(self.first_loss) else self.first_loss
        self.last_loss, self.tokens, self.peak = loss, self.tokens + tokens, max(self.peak, peak)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / dt:.0f}", mem=fmt_bytes(peak))
        if step % self.log_every == 0 or step == self.total:
            record = {"step": step, "loss": loss, "lr": extra.pop("lr"), "grad_norm": extra.pop("grad_norm")}
            record |= {"tokens_per_s": tokens / dt, "step_time_s": dt, "peak_bytes": peak, **extra}
            record |= {f"method/{k}": v for k, v in method.items() if type(v) in (int, float)}
            self.run_log.log(record)

    def close(self) -> None:
        self.bar.close()

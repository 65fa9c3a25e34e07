"""`slimtune bench`: several methods on the same model, data and settings, each in a fresh process.

Writes ``results.json`` (schema in docs/bench.md), ``results.md`` and ``results.png`` and returns the results.
Ratios compare each run with the baseline measured in the same invocation: memory = baseline peak / run peak,
speed = run tokens/s / baseline tokens/s.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimtune.bench.worker import RUN_KEYS, TRAIN_KEYS
from slimtune.core import hostmem
from slimtune.core.errors import ConfigError, UserError
from slimtune.core.schema import build
from slimtune.training.config import TrainConfig, parse_overrides

WORKERS = {False: "slimtune.bench.worker", True: "slimtune.bench.peers"}
"""The module each run executes in its own process: slimtune's measurement, or a peer's."""
PROBES = ("nf4-forward",)
"""Bench-only measurements that are not methods: `nf4-forward` times the 4-bit backbone's no-grad forward."""


@dataclass
class BenchPlan:
    model: str | None = "smollm2-135m"
    shape: str | None = None
    batch: int = 4
    seq_len: int = 256
    steps: int = 8
    warmup: int = 2
    seed: int = 0
    threads: int | None = None
    dtype: str = "auto"
    timeout_s: int = 1800
    peers: list[str] = field(default_factory=list)  # e.g. ["hf"]: slimtune.bench.peers
    procs: int = 1  # processes per slimtune run (torchrun); the run's settings may name its engine
    runs: list[dict] = field(default_factory=list)  # [{"method": ..., "settings": {...}}]


def label(run: dict) -> str:
    if run.get("peer"):
        from slimtune.bench.peers import peer_label

        return peer_label(run["peer"], run["method"])
    settings = {k: v for k, v in run.get("settings", {}).items() if k != "baseline"}
    if not settings:
        return run["method"]
    return f"{run['method']}[{','.join(f'{k}={v}' for k, v in sorted(settings.items()))}]"


def plan_from_args(methods: str | None, yaml_path: str | None, overrides: list[str], **opts) -> BenchPlan:
    """Build a plan from a YAML file and/or --methods, applying ``method.key=value`` overrides; every run's
    method and settings are validated here, before anything runs (a workflow such as PEMA is refused)."""
    from slimtune.methods import METHODS, require_trainer

    raw: dict = {}
    if yaml_path:
        from slimtune.training.config import read_yaml

        raw = read_yaml(yaml_path)
        unknown = set(raw) - set(BenchPlan.__dataclass_fields__)
        if unknown:
            raise UserError(f"{yaml_path}: unknown key(s) {', '.join(sorted(unknown))}")
    plan = BenchPlan(**{k: v for k, v in raw.items() if k != "runs"})
    plan.runs = [dict(r) for r in raw.get("runs", [])]
    for k, v in opts.items():
        if v is not None:
            setattr(plan, k, v)
    if plan.shape:
        plan.model = None
    if methods:
        plan.runs = [{"method": m.strip(), "settings": {}} for m in methods.split(",") if m.strip()]
    if not plan.runs:
        raise UserError("bench: name the methods (--methods full,lora,qlora) or give a YAML with runs:")
    _check_peers(plan)
    if plan.procs < 1:
        raise UserError(f"bench --procs: {plan.procs} must be >= 1")
    if plan.procs > 1 and plan.peers:
        raise UserError("bench --procs with --peers: the peers run in one process; measure them separately")
    extra = parse_overrides(overrides) if overrides else {}
    for name in extra:
        if name not in METHODS:
            raise UserError(f"bench override '{name}.…': '{name}' is not one of {', '.join(METHODS)}")
    for r in plan.runs:
        if r["method"] in PROBES:
            r.setdefault("settings", {})
            continue
        require_trainer(r["method"], "bench")
        r["settings"] = {**r.get("settings", {}), **extra.get(r["method"], {})}
        check = {k: v for k, v in r["settings"].items() if k not in RUN_KEYS}
        METHODS[r["method"]].config_cls(**check)  # a bad setting fails here, before anything runs
        problems: list[str] = []  # (typed as a config file's train section is: `compile=fast` is no bool)
        train = {k: v for k, v in r["settings"].items() if k in TRAIN_KEYS}
        if train.get("optimizer_in_backward") is True:  # (the bench turns clipping off for it: run_config)
            train["max_grad_norm"] = None
        build(TrainConfig, train, "train", problems)
        if problems:
            raise ConfigError([p.removeprefix("train.") for p in problems])
    return plan


def _check_peers(plan: BenchPlan) -> None:
    """Validate ``plan.peers``; the peer runs are added after slimtune's in :func:`bench`."""
    from slimtune.bench.peers import PEERS, covered

    if isinstance(plan.peers, str):
        plan.peers = [p for p in plan.peers.split(",") if p]
    bad = [p for p in plan.peers if p not in PEERS]
    if bad:
        raise UserError(f"bench --peers: unknown peer '{bad[0]}' (known: {', '.join(PEERS)})")
    if plan.peers and not any(r["method"] in covered(p) for p in plan.peers for r in plan.runs):
        raise UserError(
            f"bench --peers {','.join(plan.peers)}: none of the methods has a peer "
            f"(the peers cover {', '.join(sorted({m for p in plan.peers for m in covered(p)}))})"
        )


def _meta(plan: BenchPlan) -> dict:
    import transformers

    try:
        git = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        git = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or "cpu")
    return {
        "slimtune": importlib.metadata.version("slimtune"),
        "git": git,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "threads": plan.threads or torch.get_num_threads(),
        "model": plan.shape or plan.model,
        "shape": plan.shape,
        "batch": plan.batch,
        "seq_len": plan.seq_len,
        "steps": plan.steps,
        "warmup": plan.warmup,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_one(plan: BenchPlan, run: dict, workdir: Path) -> dict:
    spec = {
        "model": plan.model,
        "shape": plan.shape,
        "method": run["method"],
        "settings": run["settings"],
        "batch": plan.batch,
        "seq_len": plan.seq_len,
        "steps": plan.steps,
        "warmup": plan.warmup,
        "seed": plan.seed,
        "threads": plan.threads,
        "dtype": plan.dtype,
        "peer": run.get("peer"),
        "peer_kind": run.get("kind"),
        "procs": 1 if run.get("peer") else plan.procs,
    }
    name = label(run).replace("/", "_")
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    base = {
        "method": run["method"],
        "label": label(run),
        "settings": run["settings"],
        "peer": run.get("peer"),
    }
    try:
        proc = subprocess.run(
            [*_launcher(spec["procs"]), "-m", WORKERS[bool(run.get("peer"))], str(spec_path), str(out_path)],
            capture_output=True,
            text=True,
            timeout=plan.timeout_s,
            env={
                **(hostmem.as_users_run(os.environ) if run.get("peer") else _slimtune_env()),
                "PYTHONUNBUFFERED": "1",
            },
        )
    except subprocess.TimeoutExpired:
        return {**base, "ok": False, "error": f"timed out after {plan.timeout_s} s"}
    if out_path.is_file():
        return {**base, **json.loads(out_path.read_text())}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**base, "ok": False, "error": f"worker exited {proc.returncode}: {' | '.join(tail)}"}


def _slimtune_env() -> dict[str, str]:
    """A slimtune run's environment: what the ``slimtune`` command runs with (TCMalloc preloaded where installed,
    hostmem.py), also when the bench is called from Python."""
    return hostmem.allocator_env(os.environ) or dict(os.environ)


def _launcher(procs: int) -> list[str]:
    """The command that starts a worker: this Python, or torchrun with ``procs`` processes (gloo on CPUs)."""
    if procs == 1:
        return [sys.executable]
    torchrun = Path(sys.executable).parent / "torchrun"
    return [str(torchrun), "--nproc_per_node", str(procs), "--no-python", sys.executable]


def ratios(runs: list[dict]) -> dict:
    from slimtune.methods import baseline_of

    by_label = {r["label"]: r for r in runs}
    out = {}
    for r in runs:
        if r["method"] in PROBES or r.get("peer"):
            continue
        baseline = r["settings"].get("baseline") or baseline_of(r["method"])
        b = by_label.get(baseline)
        entry = {"baseline": baseline, "memory": None, "speed": None}
        if b is not None and b.get("ok") and r.get("ok"):
            entry["memory"] = b["peak_bytes"] / r["peak_bytes"]
            entry["speed"] = r["tokens_per_s"] / b["tokens_per_s"]
        out[r["label"]] = entry
    return out


def ceilings(runs: list[dict]) -> dict:
    """Speed ceiling of forward-only side methods: QLoRA's step time / the 4-bit backbone's forward time."""
    from slimtune.methods import four_bit_baseline

    by_label = {r["label"]: r for r in runs if r.get("ok")}
    probe, qlora = by_label.get("nf4-forward"), by_label.get(four_bit_baseline())
    if probe is None or qlora is None:
        return {}
    return {
        "qlora_step_s": qlora["step_time_median_s"],
        "nf4_forward_s": probe["step_time_median_s"],
        "nf4_forward_with_head_s": probe["forward_with_head_median_s"],
        "speed_ceiling": qlora["step_time_median_s"] / probe["step_time_median_s"],
        "speed_ceiling_with_head": qlora["step_time_median_s"] / probe["forward_with_head_median_s"],
    }


def bench(plan: BenchPlan, out_dir: str | Path, echo=print) -> dict:
    from slimtune.bench.peers import peer_ratios, peer_runs
    from slimtune.bench.report import write_markdown, write_png

    out = Path(out_dir)
    if (out / "results.json").exists():
        raise UserError(f"bench --out '{out}' already holds results.json; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in plan.runs + peer_runs(plan.runs, plan.peers):
            echo(f"bench: {label(run)} ...")
            res = run_one(plan, run, Path(tmp))
            runs.append(res)
            if res.get("ok"):
                echo(
                    f"bench: {label(run)}: {res['step_time_median_s']:.3f} s/step, "
                    f"{res['tokens_per_s']:.0f} tokens/s, peak {res['peak_bytes'] / 1e9:.2f} GB"
                )
            else:
                echo(f"bench: {label(run)}: FAILED ({res['error']})")
    results = {
        "meta": _meta(plan),
        "runs": runs,
        "ratios": ratios(runs),
        "peers": peer_ratios(runs),
        "ceilings": ceilings(runs),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "results.md")
    write_png(results, out / "results.png")
    return results

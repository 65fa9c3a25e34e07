"""Killed runs resume exactly: `slimtune train` in a subprocess is sent SIGKILL at random moments (during steps,
evaluations and checkpoint writes, widened by a test-only delay), resumed with `--resume`, and killed again; the
finished run's per-step losses and final state must equal an uninterrupted run's, bit for bit (CPU, fp32).
SIGTERM and SIGINT stop it cleanly (checkpoint, exit 143/130); a second SIGINT exits at once.

CI runs three kills for each of three method families; the soak (``SLIMTUNE_SOAK_KILLS=20 pytest -s -m slow -k
soak``) runs 20 per family, seven families.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from safetensors.torch import load_file

from slimtune.capabilities.probes import SETTINGS
from slimtune.training import config as C
from slimtune.training.checkpoint import CKPT, DELAY_ENV, PREV, TMP, latest_checkpoint, verify
from tests.registry import trainers

FAMILIES = trainers()
STEPS = 8


def write_config(tmp: Path, model_dir: Path, data: Path, method: str, out: Path, **train) -> Path:
    raw = {
        "model": {"name": str(model_dir)},
        "data": {"path": str(data), "max_length": 48, "eval_size": 4},
        "train": {
            "steps": STEPS,
            "batch_size": 4,
            "lr": SETTINGS[method][1],
            "schedule": "cosine",
            "warmup_steps": 1,
            "save_every": 2,
            "eval_every": 3,
            "num_generations": 0,
            "eval_metric": False,
            "threads": 1,
            "output_dir": str(out),
            **train,
        },
        "method": {"name": method, **SETTINGS[method][0]},
    }
    path = tmp / f"{method}-{out.name}.yaml"
    C.save_config(C.from_dict(raw), path)
    return path


def launch(args: list[str], delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, DELAY_ENV: str(delay), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "slimtune.cli", "train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def step_losses(run: Path) -> dict[int, float]:
    """The loss logged for each step; a step re-run after a resume counts with its last record."""
    out = {}
    for line in (run / "logs" / "train.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def final_state(run: Path) -> dict:
    d = run / "final"
    return load_file(str(next(d.glob("*.safetensors"))))


@dataclass
class Soak:
    kills: int = 0
    resumes: int = 0
    unusable_found: int = 0
    during_save: int = 0  # kills while a checkpoint write was in progress (.checkpoint.tmp present)
    steps_at_kill: list[int] = field(default_factory=list)


def _step_reached(run: Path) -> int:
    log = run / "logs" / "train.jsonl"
    if not log.is_file():
        return 0
    steps = [json.loads(x).get("step", 0) for x in log.read_text().splitlines() if x.strip()]
    return max(steps, default=0)


def _loaded(proc: subprocess.Popen, run: Path, since: float) -> bool:
    """Wait until the launched run has loaded its model (it writes config.yaml then); False if it exited."""
    cfg = run / "config.yaml"
    while not (cfg.is_file() and cfg.stat().st_mtime >= since):
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return True


def kill_and_resume(cfg: Path, run: Path, kills: int, rng: random.Random, delay: float) -> Soak:
    """Start the run; SIGKILL it ``kills`` times at a random moment within 2.5 s of its model loading (each
    time resuming it, or starting it again where it died before writing its config); then let it finish."""
    soak = Soak()
    since, proc = time.time(), launch([str(cfg)], delay)
    while soak.kills < kills and _loaded(proc, run, since):
        deadline = time.monotonic() + rng.uniform(0.0, 2.5)
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is not None:
            break  # finished before this kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        soak.kills += 1
        tmp = run / TMP
        soak.during_save += (
            tmp.is_dir() and tmp.stat().st_mtime >= since
        )  # this launch's write, not a leftover
        soak.steps_at_kill.append(_step_reached(run))
        soak.unusable_found += sum(
            (run / n).is_dir() and verify(run / n)[1] is not None for n in (CKPT, PREV)
        )
        latest_checkpoint(run)  # never raises: a usable checkpoint or none yet
        soak.resumes += 1
        since, proc = time.time(), launch(["--resume", str(run)], delay)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and (run / "results.json").is_file(), err[-2000:]
    return soak


def reference(tmp: Path, model_dir: Path, data: Path, method: str, **train) -> Path:
    run = tmp / f"{method}-straight"
    proc = launch([str(write_config(tmp, model_dir, data, method, run, **train))])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return run


def check_same_run(straight: Path, crashed: Path) -> None:
    want, got = step_losses(straight), step_losses(crashed)
    assert sorted(want) == list(range(1, len(want) + 1)) and got == want, (want, got)
    # the result covers the whole run, not the last process's part of it
    want_res, got_res = (json.loads((r / "results.json").read_text()) for r in (straight, crashed))
    for key in ("train_loss_first", "train_loss_last", "tokens", "steps"):
        assert got_res[key] == want_res[key], key
    a, b = final_state(straight), final_state(crashed)
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()))]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _soak(method, tiny_model_dir, instr_jsonl, tmp_path, kills: int, seed: int, steps: int) -> Soak:
    """Kill runs of ``method`` until ``kills`` kills (a run that finishes first is checked and another one
    started); every finished run must equal the uninterrupted reference."""
    straight = reference(tmp_path, tiny_model_dir, instr_jsonl, method, steps=steps)
    total, rng, runs = Soak(), random.Random(seed), 0
    while total.kills < kills:
        runs += 1
        run = tmp_path / f"{method}-killed-{runs}"
        cfg = write_config(tmp_path, tiny_model_dir, instr_jsonl, method, run, steps=steps)
        soak = kill_and_resume(cfg, run, kills - total.kills, rng, delay=0.15)
        check_same_run(straight, run)
        total.kills += soak.kills
        total.resumes += soak.resumes
        total.during_save += soak.during_save
        total.unusable_found += soak.unusable_found
        total.steps_at_kill += soak.steps_at_kill
    print(f"{method}: {runs} runs, {total}")
    assert total.unusable_found == 0
    return total


@pytest.mark.parametrize("method", ["lora", "meft", "pst"])
def test_killed_runs_resume_exactly(method, tiny_model_dir, instr_jsonl, tmp_path):
    soak = _soak(method, tiny_model_dir, instr_jsonl, tmp_path, kills=3, seed=7, steps=STEPS)
    assert soak.kills == 3


@pytest.mark.slow
@pytest.mark.skipif(
    "SLIMTUNE_SOAK_KILLS" not in os.environ,
    reason="the 20-kill soak of every family takes ~30 min: SLIMTUNE_SOAK_KILLS=20 pytest -s -m slow -k soak",
)
@pytest.mark.parametrize("method", FAMILIES)
def test_kill_soak(method, tiny_model_dir, instr_jsonl, tmp_path):
    kills = int(os.environ.get("SLIMTUNE_SOAK_KILLS", "20"))
    seed = FAMILIES.index(method)
    soak = _soak(method, tiny_model_dir, instr_jsonl, tmp_path, kills=kills, seed=seed, steps=3 * STEPS)
    assert soak.kills == kills


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _step_reached(run) < step:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_and_says_how_to_resume(sig, code, tiny_model_dir, instr_jsonl, tmp_path):
    straight = reference(tmp_path, tiny_model_dir, instr_jsonl, "lora")
    run = tmp_path / "lora-stopped"
    proc = launch([str(write_config(tmp_path, tiny_model_dir, instr_jsonl, "lora", run, save_every=0))])
    _wait_for_step(proc, run, 1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert f"slimtune train --resume {run}" in err and "Traceback" not in err
    stopped_at = json.loads((run / CKPT / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped_at < STEPS
    proc = launch(["--resume", str(run)])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    check_same_run(straight, run)


def test_a_second_sigint_exits_at_once(tiny_model_dir, instr_jsonl, tmp_path):
    run = tmp_path / "lora-twice"
    cfg = write_config(tmp_path, tiny_model_dir, instr_jsonl, "lora", run, save_every=1, steps=200)
    proc = launch([str(cfg)], delay=0.5)  # slow saves: the second Ctrl-C lands in one
    _wait_for_step(proc, run, 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 5 and proc.returncode == 130, err[-2000:]
    assert "again: exiting now" in err
    path, manifest = latest_checkpoint(run)  # whatever it was doing, a good checkpoint remains
    assert manifest["step"] >= 1


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_at_one_step(tiny_model_dir, instr_jsonl, tmp_path):
    """A scheduler's SIGTERM to `torchrun` reaches both ranks; they agree on the step, rank 0 saves it, and the
    resumed 2-process run ends where an uninterrupted 2-process run ends."""
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "-m", "slimtune.cli"]

    def run2(args: list[str]) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(
            [*torchrun, "train", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    straight = tmp_path / "ddp-straight"
    proc = run2([str(write_config(tmp_path, tiny_model_dir, instr_jsonl, "lora", straight, batch_size=2))])
    assert proc.wait(timeout=600) == 0, proc.communicate()[1][-2000:]
    run = tmp_path / "ddp-stopped"
    proc = run2(
        [str(write_config(tmp_path, tiny_model_dir, instr_jsonl, "lora", run, batch_size=2, save_every=0))]
    )
    _wait_for_step(proc, run, 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped by SIGTERM after step" in err, err[-3000:]
    assert 1 <= json.loads((run / CKPT / "trainer_state.json").read_text())["step"] < STEPS
    proc = run2(["--resume", str(run)])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    check_same_run(straight, run)

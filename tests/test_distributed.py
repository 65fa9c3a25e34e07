"""Two CPU processes (torchrun, gloo) train like one: the same global batch gives the same per-step losses and the
same final method state as a single process, for every trainer method under DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "ddp_worker.py"
STEPS = 4
TOL = 2e-5  # float summation order differs between one process and a gloo all-reduce of two


def _run(method: str, procs: int, out: Path) -> tuple[list[float], dict]:
    out.mkdir(parents=True)
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", str(procs), str(WORKER), method, str(STEPS), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "losses.json").read_text())
    assert rec["world"] == procs
    return rec["losses"], load_file(str(out / "state.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora", "qst", "sat", "pst", "meft"])
def test_two_ddp_processes_train_like_one(method, tmp_path):
    one_losses, one = _run(method, 1, tmp_path / "one")
    two_losses, two = _run(method, 2, tmp_path / "two")
    assert two_losses == pytest.approx(one_losses, rel=TOL, abs=TOL)
    assert one.keys() == two.keys()
    worst = max((float((one[k] - two[k]).abs().max()), k) for k in one)
    assert worst[0] <= 1e-4, f"largest difference {worst[0]:.2e} in {worst[1]}"
    moved = _initial(method)
    assert any(not torch.equal(moved[k], one[k]) for k in one), "nothing trained"


def _initial(method: str) -> dict:
    from slimtune.capabilities import adapt

    return {k: v.detach().float() for k, v in adapt(method, "llama").state_dict().items()}


def test_docs_show_the_engine_table_the_code_enforces():
    from slimtune.engines import render

    doc = (Path(__file__).parents[1] / "docs" / "distributed.md").read_text()
    begin, end = "<!-- engines:begin -->\n", "<!-- engines:end -->"
    assert doc[doc.index(begin) + len(begin) : doc.index(end)] == render()


@pytest.mark.parametrize(
    "env, engine",
    [
        ({}, "single"),
        ({"WORLD_SIZE": "2"}, "ddp"),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, "fsdp"),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, "deepspeed"),
    ],
)
def test_the_launched_engine_is_read_from_the_launcher(env, engine):
    from slimtune.engines import launched_engine

    assert launched_engine(env) == engine


def test_an_unsupported_pair_exits_2_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from slimtune.cli import main

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: {tmp_path}/no-such-model}}\nmethod: {{name: meft}}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimtune: error: method 'meft' under fsdp: ") and "torchrun" in err
    assert "no-such-model" not in err  # refused before the model path is even looked at

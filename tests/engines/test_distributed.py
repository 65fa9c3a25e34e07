"""Two CPU processes (torchrun, gloo) train like one: the same global batch gives the same per-step losses and the
same final method state as a single process, for every trainer method under DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.registry import sharded, trainers

WORKER = Path(__file__).parent / "ddp_worker.py"
STEPS = 4
TOL = 2e-5  # float summation order differs between one process and a gloo all-reduce of two


def _run(
    method: str, procs: int, out: Path, engine: str = "ddp", save_at: int = 0, env: dict | None = None
) -> tuple[list[float], dict]:
    out.mkdir(parents=True)
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", str(procs), str(WORKER), method, str(STEPS), str(out), engine]
    cmd += [str(save_at)] if save_at else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "losses.json").read_text())
    assert rec["world"] == procs
    assert rec["sharded"] == (engine == "fsdp" and procs > 1)
    return rec["losses"], load_file(str(out / "state.safetensors"))


BNB = ["qlora:backend=bitsandbytes", "qst:backend=bitsandbytes"]
PARTITION_ALL = {
    "SLIMTUNE_DEEPSPEED_CONFIG": json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}})
}
"""ZeRO-3 keeps tensors under 100k elements whole by default: every tensor of the tiny test model."""

_REFERENCES: dict[tuple[str, str], tuple[list[float], dict]] = {}


def _one_process(method: str, tmp_path_factory, env: dict | None = None) -> tuple[list[float], dict]:
    """One process's run of ``method`` (the reference every 2-process case is compared with), computed once per
    session: in one process every engine is the single-process trainer."""
    key = (method, json.dumps(env or {}, sort_keys=True))
    if key not in _REFERENCES:
        _REFERENCES[key] = _run(method, 1, tmp_path_factory.mktemp("one") / "out", env=env)
    return _REFERENCES[key]


def _same(method: str, one: tuple[list[float], dict], two: tuple[list[float], dict]) -> None:
    (one_losses, one), (two_losses, two) = one, two
    assert two_losses == pytest.approx(one_losses, rel=TOL, abs=TOL)
    assert one.keys() == two.keys()
    worst = max((float((one[k] - two[k]).abs().max()), k) for k in one)
    assert worst[0] <= 1e-4, f"largest difference {worst[0]:.2e} in {worst[1]}"
    moved = _initial(method)
    assert any(not torch.equal(moved[k], one[k]) for k in one), "nothing trained"


@pytest.mark.slow
@pytest.mark.parametrize("method", trainers())
def test_two_ddp_processes_train_like_one(method, tmp_path, tmp_path_factory):
    _same(method, _one_process(method, tmp_path_factory), _run(method, 2, tmp_path / "two"))


@pytest.mark.slow
@pytest.mark.parametrize("method", [*sharded(), *BNB])
def test_two_fsdp_processes_train_like_one(method, tmp_path, tmp_path_factory):
    """FSDP2 shards every parameter over the two ranks; the losses and the gathered method state are one
    process's. The second half runs in a new trainer resumed from the checkpoint the first half wrote."""
    one = _one_process(method, tmp_path_factory)
    _same(method, one, _run(method, 2, tmp_path / "two", "fsdp", save_at=STEPS // 2))


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, stage",
    [(m, 3) for m in [*sharded(), *BNB]] + [(m, 2) for m in ("full", BNB[0])],
)
def test_two_deepspeed_processes_train_like_one(method, stage, tmp_path, tmp_path_factory):
    """DeepSpeed ZeRO partitions AdamW's state and the gradients (stage 3: the parameters too) over the two
    ranks; the losses and the method state gathered for saving are one process's."""
    zero = {"SLIMTUNE_TEST_TRAIN": json.dumps({"zero_stage": stage}), **PARTITION_ALL}
    _same(
        method,
        _one_process(method, tmp_path_factory),
        _run(method, 2, tmp_path / "two", "deepspeed", env=zero),
    )


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "deepspeed"])
def test_two_processes_with_gradient_checkpointing_and_clipping_train_like_one(
    engine, tmp_path, tmp_path_factory
):
    """Checkpointed activations, and a clipping norm low enough to clip every step (the norm of sharded
    gradients must be the global one)."""
    opts = {"SLIMTUNE_TEST_TRAIN": json.dumps({"grad_checkpointing": True, "max_grad_norm": 0.05})}
    one = _one_process("lora", tmp_path_factory, opts)
    _same("lora", one, _run("lora", 2, tmp_path / "two", engine, env=opts))


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_in_one_process(tmp_path, tmp_path_factory):
    """A checkpoint written under FSDP is the single-process format: one process resumes it."""
    _run("full", 2, tmp_path / "two", "fsdp", save_at=STEPS // 2)
    one = _one_process("full", tmp_path_factory)
    run = tmp_path / "two" / "run"
    (tmp_path / "three").mkdir()
    shutil.copytree(run, tmp_path / "three" / "run")
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "1",
        str(WORKER),
        "full",
        str(STEPS),
        str(tmp_path / "three"),
        "fsdp",
    ]
    proc = subprocess.run(cmd + ["-1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "three" / "losses.json").read_text())
    assert rec["losses"] == pytest.approx(one[0][STEPS // 2 :], rel=TOL, abs=TOL)
    three = load_file(str(tmp_path / "three" / "state.safetensors"))
    assert max(float((one[1][k] - three[k]).abs().max()) for k in three) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("method, stage", [("lora", 3), ("full", 2)])
def test_a_deepspeed_checkpoint_resumes_in_one_process_and_not_under_deepspeed(
    method, stage, tmp_path, tmp_path_factory
):
    """The checkpoint gathers the parameters (ZeRO-3) and assembles AdamW's moments from the partitions (ZeRO-2:
    two parameter groups, slices on both ranks): one process resumes it to the same losses and state as a run
    never stopped. Resuming under DeepSpeed is refused with one line (not built)."""
    zero = {"SLIMTUNE_TEST_TRAIN": json.dumps({"zero_stage": stage}), **PARTITION_ALL}
    half = STEPS // 2
    out = tmp_path / "two"
    out.mkdir()
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node"]
    env = {**os.environ, **zero}
    cmd = [str(WORKER), method, str(half), str(out), "deepspeed", str(half)]
    proc = subprocess.run(torchrun + ["2"] + cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _one_process(method, tmp_path_factory)
    (tmp_path / "three").mkdir()
    shutil.copytree(out / "run", tmp_path / "three" / "run")
    cmd = [str(WORKER), method, str(STEPS), str(tmp_path / "three"), "ddp", "-1"]
    proc = subprocess.run(torchrun + ["1"] + cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "three" / "losses.json").read_text())
    assert rec["losses"] == pytest.approx(one[0][half:], rel=TOL, abs=TOL)
    three = load_file(str(tmp_path / "three" / "state.safetensors"))
    assert max(float((one[1][k] - three[k]).abs().max()) for k in three) <= 1e-4
    cmd = [str(WORKER), method, str(STEPS), str(out), "deepspeed", "-1"]
    proc = subprocess.run(torchrun + ["2"] + cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0 and "--resume under deepspeed: not built" in proc.stderr


def _initial(method: str) -> dict:
    from slimtune.capabilities.probes import adapt

    name, _, extra = method.partition(":")
    settings = dict(kv.split("=", 1) for kv in extra.split(",") if kv)
    return {k: v.detach().float() for k, v in adapt(name, "llama", **settings).state_dict().items()}


def test_docs_show_the_engine_table_the_code_enforces():
    from slimtune.engines.support import render

    doc = (Path(__file__).parents[2] / "docs" / "distributed.md").read_text()
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
    from slimtune.engines.support import launched_engine

    assert launched_engine(env) == engine


def test_the_zero_stage_and_the_deepspeed_config_a_user_gives_are_the_ones_used(monkeypatch):
    from slimtune.core.errors import UserError
    from slimtune.engines.deepspeed import CONFIG_ENV, ds_config
    from slimtune.engines.support import zero_stage

    assert zero_stage(2, {}) == 2 and zero_stage(2, {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}) == 3
    with pytest.raises(UserError, match="ZeRO stage 1"):
        zero_stage(2, {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"})
    base = ds_config(4, 2, 1.0, 3, "no")
    assert base["zero_optimization"] == {"stage": 3} and base["gradient_accumulation_steps"] == 2
    monkeypatch.setenv(CONFIG_ENV, '{"zero_optimization": {"overlap_comm": true}, "gradient_clipping": 0.5}')
    merged = ds_config(4, 2, 1.0, 3, "no")
    assert (
        merged["zero_optimization"] == {"stage": 3, "overlap_comm": True}
        and merged["gradient_clipping"] == 0.5
    )
    for bad, says in (("{oops", "not JSON"), ("[1]", "a JSON object is needed")):
        monkeypatch.setenv(CONFIG_ENV, bad)
        with pytest.raises(UserError, match=says):
            ds_config(4, 2, 1.0, 3, "no")


def test_an_unsupported_pair_exits_2_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from slimtune.cli import main

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: {tmp_path}/no-such-model}}\nmethod: {{name: meft}}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimtune: error: method 'meft' under fsdp: ") and "torchrun" in err
    assert "no-such-model" not in err  # refused before the model path is even looked at


@pytest.mark.parametrize(
    "method, extra, says",
    [
        ("meft", "train.engine=fsdp", "method 'meft' under fsdp: "),
        ("lora", "train.mixed_precision=fp16 train.engine=fsdp", "train.mixed_precision: fp16 under fsdp: "),
    ],
)
def test_an_unsupported_setting_exits_2_before_the_model_loads(
    method, extra, says, tmp_path, monkeypatch, capsys
):
    from slimtune.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the check comes before any process group
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: {tmp_path}/no-such-model}}\nmethod: {{name: {method}}}\n")
    assert main(["train", str(cfg), *extra.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"slimtune: error: {says}") and "\n" not in err
    assert "no-such-model" not in err


_RANK = """
import sys, torch.distributed as dist
from slimtune.cli import main
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
main(sys.argv[2:])
print("the interpreter went on")
"""


@pytest.mark.parametrize("args, code", [(["list"], 0), (["validate", "missing.yaml"], 2)])
def test_a_rank_of_a_job_ends_with_the_commands_code_and_no_teardown(args, code, tmp_path):
    """A rank of a torchrun job ends right after its command, with its exit code, without the interpreter's
    teardown (where gloo's threads can abort or deadlock a finished rank: engines.end_job)."""
    proc = subprocess.run(
        [sys.executable, "-c", _RANK, str(tmp_path / "store"), *args],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "the interpreter went on" not in proc.stdout
    assert ("methods" in proc.stdout) if code == 0 else ("missing.yaml" in proc.stderr)

"""The benchmark harness on tiny models: schema, a failing run recorded, ratios from the same invocation."""

import json

import pytest

from slimtune.bench.run import BenchPlan, bench, label, plan_from_args, ratios
from slimtune.bench.worker import run_config
from slimtune.core.errors import ConfigError, UserError
from slimtune.models.shapes import SHAPES, build_shape
from tests.conftest import expected_allocator

RUN_KEYS = {
    "method",
    "settings",
    "ok",
    "error",
    "trainable_params",
    "total_params",
    "peak_rss_bytes",
    "cuda_peak_allocated_bytes",
    "peak_bytes",
    "memory_by_role",
    "step_time_median_s",
    "step_times_s",
    "tokens_per_s",
    "loss_first",
    "loss_last",
}
META_KEYS = {
    "slimtune",
    "git",
    "torch",
    "transformers",
    "device",
    "threads",
    "model",
    "batch",
    "seq_len",
    "steps",
    "date",
}


@pytest.mark.slow
def test_bench_schema_failure_and_ratios(tmp_path):
    plan = BenchPlan(
        model="tiny",
        batch=2,
        seq_len=16,
        steps=2,
        warmup=1,
        runs=[
            {"method": "full", "settings": {}},
            {"method": "lora", "settings": {"r": 4}},
            {
                "method": "lora",
                "settings": {"r": 8, "target_modules": ["no_such_module"]},
            },  # fails inside peft
        ],
    )
    res = bench(plan, tmp_path / "out", echo=lambda *_: None)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert META_KEYS <= set(res["meta"])
    ok = [r for r in res["runs"] if r["ok"]]
    assert len(ok) == 2 and all(RUN_KEYS <= set(r) for r in ok)
    failed = [r for r in res["runs"] if not r["ok"]]
    assert len(failed) == 1 and "no_such_module" in failed[0]["error"]
    for r in ok:
        assert r["cuda_peak_allocated_bytes"] is None and r["peak_bytes"] == r["peak_rss_bytes"] > 0
        assert len(r["step_times_s"]) == 2 and r["tokens_per_s"] == pytest.approx(
            32 / r["step_time_median_s"]
        )
        assert r["memory_by_role"]["gradients"] > 0 and r["memory_by_role"]["optimizer"] > 0
    full = res["runs"][0]
    # full fine-tuning: gradients and AdamW state match the parameter count (fp32: 4 and 8 bytes/param)
    assert full["memory_by_role"]["gradients"] == 4 * full["trainable_params"]
    # AdamW keeps two fp32 moments per parameter plus a 0-dim step counter per tensor
    from slimtune.models.loading import tiny_llama

    n_tensors = len(list(tiny_llama().parameters()))
    assert full["memory_by_role"]["optimizer"] == 8 * full["trainable_params"] + 4 * n_tensors
    lora = res["runs"][1]
    r = res["ratios"]
    assert r["lora[r=4]"]["baseline"] == "lora" and r["lora[r=4]"]["memory"] is None  # no plain 'lora' run
    assert r["full"] == {"baseline": "full", "memory": 1.0, "speed": 1.0}
    assert lora["trainable_params"] < full["trainable_params"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| full | yes |" in md and "**failed**" in md
    assert (tmp_path / "out" / "results.png").stat().st_size > 10_000
    with pytest.raises(UserError, match="already holds results.json"):
        bench(plan, tmp_path / "out", echo=lambda *_: None)


def test_ratios_use_runs_of_the_same_invocation():
    runs = [
        {
            "label": "lora",
            "method": "lora",
            "settings": {},
            "ok": True,
            "peak_bytes": 400,
            "tokens_per_s": 10.0,
        },
        {
            "label": "qlora",
            "method": "qlora",
            "settings": {},
            "ok": True,
            "peak_bytes": 200,
            "tokens_per_s": 5.0,
        },
        {
            "label": "full",
            "method": "full",
            "settings": {"baseline": "lora"},
            "ok": True,
            "peak_bytes": 800,
            "tokens_per_s": 20.0,
        },
    ]
    r = ratios(runs)
    assert r["qlora"] == {"baseline": "qlora", "memory": 1.0, "speed": 1.0}
    assert r["full"] == {"baseline": "lora", "memory": 0.5, "speed": 2.0}


def test_plan_overrides_and_errors(tmp_path):
    plan = plan_from_args("full,lora", None, ["lora.r=32"], batch=2)
    assert [label(r) for r in plan.runs] == ["full", "lora[r=32]"] and plan.batch == 2
    with pytest.raises(UserError, match="'dora' is not one of"):
        plan_from_args("dora", None, [])
    with pytest.raises(ConfigError, match="r: 0 must be > 0"):
        plan_from_args("lora", None, ["lora.r=0"])
    y = tmp_path / "b.yaml"
    y.write_text("model: tiny\nsteps: 3\nruns:\n  - method: lora\n    settings: {r: 8}\n  - method: full\n")
    plan = plan_from_args(None, str(y), [])
    assert plan.steps == 3 and [label(r) for r in plan.runs] == ["lora[r=8]", "full"]


def test_shapes_match_published_parameter_counts():
    assert sum(p.numel() for p in build_shape("llama2-7b", device="meta").parameters()) == 6_738_415_616
    assert sum(p.numel() for p in build_shape("smollm2-135m", device="meta").parameters()) == 134_515_008
    assert "llama3-8b" in SHAPES


@pytest.mark.slow
def test_bench_peers_compute_and_loss_term(tmp_path):
    """`--peers hf` adds one transformers.Trainer + peft run per covered method, compared in the same run; every
    slimtune run carries its FLOPs per step, the measured matmul rate and both sizes of the loss term."""
    plan = BenchPlan(
        model="tiny",
        batch=2,
        seq_len=16,
        steps=2,
        warmup=1,
        peers=["hf"],
        runs=[
            {"method": "lora", "settings": {"r": 4}},
            {"method": "lora", "settings": {"r": 4, "memory": "low"}},
        ],
    )
    res = bench(plan, tmp_path / "out", echo=lambda *_: None)
    assert [r["label"] for r in res["runs"]] == ["lora[r=4]", "lora[memory=low,r=4]", "hf:lora"]
    assert all(r["ok"] for r in res["runs"]), [r["error"] for r in res["runs"]]
    mine, low, peer = res["runs"]
    assert peer["trainable_params"] == mine["trainable_params"]  # the same LoRA, built by peft directly
    assert mine["allocator"] == low["allocator"] == expected_allocator()  # as the `slimtune` command runs
    assert peer["allocator"] == "system" and not peer["huge_pages"]  # as users run the peer
    assert len(peer["step_times_s"]) == 2 and peer["peak_bytes"] > 0
    assert set(res["peers"]) == {"lora[r=4]", "lora[memory=low,r=4]"}
    p = res["peers"]["lora[r=4]"]
    assert p["peer"] == "hf:lora" and p["memory"] == pytest.approx(peer["peak_bytes"] / mine["peak_bytes"])
    for r in (mine, low):
        c = r["compute"]
        assert c["flops_per_step"] > 0 and c["matmul_flops_per_s"] > 1e8
        assert c["flop_share"] == pytest.approx(c["flop_limit_step_s"] / r["step_time_median_s"])
        assert r["loss_path"] == "chunked"
        assert r["loss_term_bytes"]["logits"] > r["loss_term_bytes"]["chunked"] > 0  # sizes: test_losses
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| lora[r=4] | hf:lora |" in md and "share of the limit" in md


def test_bench_peer_and_train_settings_are_checked():
    with pytest.raises(UserError, match="unknown peer 'torchtune'"):
        plan_from_args("lora", None, [], peers="torchtune")
    with pytest.raises(UserError, match="none of the methods has a peer"):
        plan_from_args("qst", None, [], peers="hf")
    with pytest.raises(ConfigError, match="memory: 'tiny' is not one of"):
        plan_from_args("lora", None, ["lora.memory=tiny"])
    plan = plan_from_args("full,lora,qst", None, ["lora.memory=low"], peers="hf")
    assert plan.peers == ["hf"] and plan.runs[1]["settings"] == {"memory": "low"}
    with pytest.raises(ConfigError, match="compile: 'fast' is not true/false"):
        plan_from_args("lora", None, ["lora.compile=fast"])
    plan = plan_from_args("lora", None, ["lora.compile=true"])
    assert run_config({**plan.runs[0], "steps": 1, "warmup": 0, "batch": 1}).train.compile is True
    # stepping inside backward cannot clip: the bench turns clipping off for it (and only for it)
    plan = plan_from_args("full", None, ["full.optimizer_in_backward=true"])
    train = run_config({**plan.runs[0], "steps": 1, "warmup": 0, "batch": 1}).train
    assert train.optimizer_in_backward is True and train.max_grad_norm is None
    assert run_config({"method": "full", "steps": 1, "warmup": 0, "batch": 1}).train.max_grad_norm == 1.0


@pytest.mark.slow
def test_bench_under_two_processes_reports_every_ranks_peak(tmp_path):
    """`bench --procs 2`: each run under torchrun, the engine a setting; rank 0 reports the peaks of both ranks,
    the largest is the run's, and tokens/s counts both ranks' rows."""
    plan = plan_from_args("lora", None, ["lora.engine=fsdp"], model="tiny", batch=2, seq_len=16, steps=2,
                          warmup=1, threads=1, procs=2)  # fmt: skip
    res = bench(plan, tmp_path / "out", echo=lambda *_: None)
    (r,) = res["runs"]
    assert r["ok"], r.get("error")
    assert r["processes"] == 2 and r["engine"] == "fsdp" and len(r["peak_bytes_per_rank"]) == 2
    assert r["peak_bytes"] == max(r["peak_bytes_per_rank"]) > 0
    assert r["tokens_per_s"] == pytest.approx(2 * 2 * 16 / r["step_time_median_s"])
    assert "lora[engine=fsdp], 2 procs, fsdp" in (tmp_path / "out" / "results.md").read_text()
    from slimtune.models.loading import tiny_llama

    whole = sum(p.numel() * p.element_size() for p in tiny_llama().parameters())  # (LoRA's A/B come on top)
    assert r["memory_by_role"]["frozen_weights"] == whole // 2  # each rank holds its shard, not the whole


def test_bench_processes_are_checked():
    with pytest.raises(UserError, match="--procs: 0 must be >= 1"):
        plan_from_args("lora", None, [], procs=0)
    with pytest.raises(UserError, match="the peers run in one process"):
        plan_from_args("lora", None, [], peers="hf", procs=2)
    with pytest.raises(ConfigError, match="engine: 'zero' is not one of"):
        plan_from_args("lora", None, ["lora.engine=zero"])


def test_a_runs_peak_is_that_of_its_timed_steps(monkeypatch):
    """The measurements after the timed steps (one step under the FLOP counter, the loss term with full logits)
    must not raise the run's peak: here the FLOP step holds 1 GiB more, and the run's peak stays below it."""
    import torch

    from slimtune.bench import worker

    def heavy_flop_step(trainer):
        blob = torch.ones(2**28)  # 1 GiB, touched
        return int(blob[0].item())

    monkeypatch.setattr(worker, "_count_flops", heavy_flop_step)
    spec = {"model": "tiny", "method": "lora", "settings": {"r": 4}, "batch": 2, "seq_len": 16, "steps": 2}
    out = worker.run({**spec, "warmup": 1, "threads": 2, "seed": 0})
    after = worker.host_peak_bytes()  # this process's peak since the timed steps began: with the 1 GiB step
    assert out["step_time_median_s"] > 0 and after > out["peak_rss_bytes"] + 2**29

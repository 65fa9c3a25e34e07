"""`slimtune plan`: the fake-tensor trace against the same tracker on real tensors, and the command's contract."""

import json

import pytest
import torch

from slimtune.cli import main
from slimtune.methods import make_config
from slimtune.models.families import family_config
from slimtune.plan.gpus import GiB, parse_budget
from slimtune.plan.trace import trace_step
from tests.registry import sharded, trainers

SMALL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
SETTINGS = {
    "qlora": {"backend": "torch"},
    "qst": {"r": 4, "backend": "torch"},
    "meft": {"r": 256, "k": 8, "experts": 16, "n_probe": 2, "cap": 32},
}
METHODS = trainers()


@pytest.mark.parametrize("method", METHODS)
def test_fake_trace_matches_the_real_step(method):
    """The plan (fake tensors, values unknown) against the same step on real tensors: the persistent roles are
    exact, and the peak is never below the real one and at most 5% above it (dynamic shapes take upper bounds)."""
    config = family_config("llama", **SMALL)
    cfg = make_config(method, **SETTINGS.get(method, {}))
    fake = trace_step(config, cfg, 2, 32, torch.float32, fake=True)
    real = trace_step(config, cfg, 2, 32, torch.float32, fake=False)
    assert (fake.frozen_bytes, fake.trainable_bytes, fake.host_bytes) == (
        real.frozen_bytes,
        real.trainable_bytes,
        real.host_bytes,
    )
    for role in ("parameters", "buffers", "gradients", "optimizer"):
        assert fake.at_grads[role] == real.at_grads[role], role
    assert real.total <= fake.total <= 1.05 * real.total, (fake.peak, real.peak)
    assert fake.flops > 0


def test_the_plan_sees_checkpointing_the_chunked_loss_and_its_flops():
    """Gradient checkpointing leaves each layer's input only (the FLOP counter, whose module hooks keep
    activations alive, runs on another step than the memory trace); the chunked loss holds no [tokens, vocab]
    logits; both losses count the head's FLOPs (PyTorch's chunked op is taught its formula)."""
    config = family_config("llama", **{**SMALL, "num_hidden_layers": 8, "vocab_size": 4096})
    lora = make_config("lora", dropout=0.0)
    plain = trace_step(config, lora, 4, 128, torch.float32)
    ckpt = trace_step(config, lora, 4, 128, torch.float32, grad_checkpointing=True)
    logits = trace_step(config, lora, 4, 128, torch.float32, chunked_loss=False)
    assert ckpt.peak["activations"] < 0.4 * plain.peak["activations"], (ckpt.peak, plain.peak)
    one_logits = 4 * 128 * 4096 * 4
    assert logits.total - plain.total > 2 * one_logits, (logits.peak, plain.peak)
    assert abs(plain.flops - logits.flops) < 0.01 * logits.flops, (plain.flops, logits.flops)
    assert ckpt.flops > 1.2 * plain.flops  # the recomputed forward


@pytest.mark.parametrize("tied", [True, False])
def test_full_fine_tuning_roles_are_what_adamw_holds(tied):
    """Every parameter's gradient counts as one: also an untied LM head's, which the chunked loss uses without
    calling the head module (the stock tracker labelled it a temporary)."""
    config = family_config("llama", **SMALL, tie_word_embeddings=tied)
    t = trace_step(config, make_config("full"), 2, 16, torch.float32)
    n_bytes = sum(
        p.numel() * 4
        for p in __import__("transformers").AutoModelForCausalLM.from_config(config).parameters()
    )
    assert t.trainable_bytes == n_bytes and t.frozen_bytes == 0
    assert t.at_grads["gradients"] == n_bytes
    n_tensors = len(list(__import__("transformers").AutoModelForCausalLM.from_config(config).parameters()))
    assert t.at_grads["optimizer"] == 2 * n_bytes + 4 * n_tensors  # exp_avg, exp_avg_sq, a float32 step each


def test_stepping_inside_backward_is_planned_with_the_trainers_hooks():
    """``--optimizer-in-backward``: the fake trace runs the trainer's own hooks, matches the real step, and no
    gradient is left when backward ends; the peak drops by about the gradients (the model is small: the
    activations are not what peaks)."""
    config = family_config("llama", **{**SMALL, "vocab_size": 4096})
    full = make_config("full")
    ordinary = trace_step(config, full, 2, 16, torch.float32)
    fake = trace_step(config, full, 2, 16, torch.float32, optimizer_in_backward=True)
    real = trace_step(config, full, 2, 16, torch.float32, fake=False, optimizer_in_backward=True)
    assert fake.at_grads["gradients"] == real.at_grads["gradients"] == 0
    assert fake.at_grads["optimizer"] == real.at_grads["optimizer"] == ordinary.at_grads["optimizer"]
    assert real.total <= fake.total <= 1.05 * real.total, (fake.peak, real.peak)
    largest = 4096 * 128 * 4  # the embedding's gradient: the only one alive while it steps
    assert ordinary.total - fake.total > ordinary.trainable_bytes - 2 * largest, (ordinary.peak, fake.peak)


def test_bf16_halves_the_weights_and_a_7b_traces_without_memory():
    from slimtune.models.shapes import shape_config

    t = trace_step(shape_config("llama2-7b", num_hidden_layers=2), make_config("lora"), 1, 64)
    # two layers of LLaMA-2-7B in bf16: embeddings + head 2 x 32000 x 4096, 2 x 202,383,360 layer weights
    assert t.frozen_bytes == 2 * (2 * 32000 * 4096 + 2 * 202_383_360 + 4096)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("24GiB", 24 * GiB),
        ("80GB", 80 * 10**9),
        ("a100-80", 80 * GiB),
        ("512 MiB", 512 * 2**20),
        ("4090", 24 * GiB),
    ],
)
def test_budgets(text, expected):
    assert parse_budget(text)[0] == expected


def _tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(family_config("llama", **SMALL).to_dict()))
    return str(path)


def test_cli_table_json_and_require(tmp_path, capsys):
    cfg = _tiny_config(tmp_path)
    assert main(["plan", "--config", cfg, "--methods", "lora,full", "--batch", "2", "--seq-len", "32",
                 "--dtype", "fp32", "--gpu", "4GiB", "--json"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"lora", "full"} and all(r["fits"] for r in rows.values())
    assert rows["full"]["optimizer"] > rows["lora"]["optimizer"]
    assert rows["lora"]["largest_batch"] > 2  # the search ran and found room
    # a budget below the CUDA context alone: nothing fits, --require fails the job
    code = main(["plan", "--config", cfg, "--methods", "lora", "--batch", "2", "--seq-len", "32", "--dtype",
                 "fp32", "--gpu", "100MiB", "--require", "lora"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1 and "lora does not fit 100MiB" in captured.err
    assert "| lora | 2 x 32 |" in captured.out and "| NO |" in captured.out


def test_largest_batch_fits_and_twice_it_does_not(tmp_path, capsys):
    cfg = _tiny_config(tmp_path)
    assert main(["plan", "--config", cfg, "--methods", "full", "--batch", "2", "--seq-len", "64", "--dtype",
                 "fp32", "--gpu", "700MiB", "--json"]) == 0  # fmt: skip
    row = json.loads(capsys.readouterr().out)["rows"][0]
    largest = row["largest_batch"]
    assert largest >= 1
    config = family_config("llama", **SMALL)
    from slimtune.plan.report import row_from_trace

    budget = parse_budget("700MiB")[0]
    at = row_from_trace(
        trace_step(config, make_config("full"), largest, 64, torch.float32), largest, 64, budget, None
    )
    twice = row_from_trace(
        trace_step(config, make_config("full"), 2 * largest, 64, torch.float32), 2 * largest, 64, budget, None
    )
    assert at.fits and not twice.fits


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--shape", "llama9-1b"], "--shape 'llama9-1b' is not one of"),
        (["--shape", "llama2-7b", "--gpu", "b200x"], "--gpu: 'b200x' is neither a size"),
        (["--shape", "llama2-7b", "--gpu", "24"], "--gpu: '24' is neither a size"),
        (["--shape", "llama2-7b", "--methods", "pema"], "pema is a workflow"),
        (["--shape", "llama2-7b", "--methods", "lora", "--require", "lora"], "--require needs a budget"),
        (["--shape", "llama2-7b", "--methods", "lora", "--dtype", "fp8"], "--dtype: 'fp8'"),
        (["--shape", "llama2-7b", "--methods", "lora", "--fit", "depth"], "--fit: 'depth'"),
        (["--shape", "llama2-7b", "--methods", "lora", "lora.r=-1"], "r: -1"),
        (["--model", "/nonexistent/dir"], "--model /nonexistent/dir: not an alias"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys, tmp_path):
    code = main(["plan", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("slimtune: error:") and needle in err[0], err


def test_a_config_that_is_not_json_is_refused(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["plan", "--config", str(bad)]) == 2
    assert "not a readable JSON file" in capsys.readouterr().err


def test_lora_without_dropout_keeps_no_copy_of_the_adapted_inputs():
    """peft's LoRA with dropout 0 reads the layer input itself (nn.Identity): it holds what full fine-tuning
    holds plus its rank-r intermediates and the MLP product (down's LoRA A keeps it as its input; full
    fine-tuning recomputes it for down's weight gradient, activations.py); with dropout > 0 every adapted linear keeps its own dropped copy for
    backward: q, k, v, o, gate, up (6 × hidden) and down (intermediate)."""
    layers, tokens = 4, 2 * 64
    config = family_config("llama", **{**SMALL, "num_hidden_layers": layers})
    d0 = trace_step(config, make_config("lora", dropout=0.0), 2, 64, torch.float32)
    d5 = trace_step(config, make_config("lora", dropout=0.05), 2, 64, torch.float32)
    full = trace_step(config, make_config("full"), 2, 64, torch.float32)
    copies = layers * tokens * (6 * SMALL["hidden_size"] + SMALL["intermediate_size"]) * 4
    assert d5.peak["activations"] - d0.peak["activations"] >= copies, (d5.peak, d0.peak)
    rank_r = (
        layers * 7 * tokens * 16 * 4
    )  # LoRA's own [tokens, r] intermediates (A x) of the 7 adapted linears
    product = layers * tokens * SMALL["intermediate_size"] * 4
    assert d0.peak["activations"] <= full.peak["activations"] + rank_r + product, (d0.peak, full.peak)


FSDP_SETTINGS = {"qlora": {"backend": "torch"}, "qst": {"r": 4, "backend": "torch"}}


def fsdp_config():
    return family_config("llama", **SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("method", sharded())
def test_an_fsdp_plan_is_what_rank_0_of_a_real_job_holds(method, tmp_path):
    """`plan --fsdp 2` (fake tensors, a fake process group) against rank 0 of a real 2-process job (real tensors,
    gloo) running the same sharded step: the shards held, gradients and optimizer state are exact; the peak from 5%
    below to 10% above the real one (measured: the fake group's collectives allocate at other moments than gloo's,
    LoRA +5.1%; SAT's real peak moves from run to run with the neurons its importance keeps, 5.74-5.93 MB, so
    the plan was 1.1% below it once)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "real.json"
    torchrun = Path(sys.executable).parent / "torchrun"
    worker = Path(__file__).parent / "plan_fsdp_worker.py"
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(worker), method, str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = json.loads(out.read_text())
    fake = trace_step(
        fsdp_config(), make_config(method, **FSDP_SETTINGS.get(method, {})), 2, 64, torch.float32, fsdp=2
    )
    one = trace_step(
        fsdp_config(), make_config(method, **FSDP_SETTINGS.get(method, {})), 2, 64, torch.float32
    )
    assert (fake.frozen_bytes, fake.trainable_bytes) == (real["frozen"], real["trainable"])
    for role in ("gradients", "optimizer"):
        assert fake.at_grads[role] == real["at_grads"][role], role
    real_total = sum(real["peak"].values())
    print(method, "fake", fake.total, "real", real_total, f"{fake.total / real_total - 1:+.1%}")
    assert 0.95 * real_total <= fake.total <= 1.10 * real_total, (fake.peak, real["peak"])
    # and sharding is visible: this rank holds half the trainable tensors and their optimizer state
    assert (
        fake.trainable_bytes < one.trainable_bytes and fake.at_grads["optimizer"] < one.at_grads["optimizer"]
    )
    assert fake.at_grads["optimizer"] == pytest.approx(one.at_grads["optimizer"] / 2, rel=0.05)


def test_plan_fsdp_refuses_a_method_fsdp_cannot_run(capsys):
    assert main(["plan", "--shape", "smollm2-135m", "--methods", "meft", "--fsdp", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimtune: error: plan --fsdp: method 'meft' does not run under FSDP")

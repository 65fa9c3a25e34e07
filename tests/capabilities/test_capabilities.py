"""The capability matrix is generated from probes, and the committed copies are current.

Probing every method on every family, dtype and trainer feature of tiny models takes about a minute here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimtune.capabilities import probes as caps
from slimtune.capabilities import render
from slimtune.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "capabilities.md"


@pytest.fixture(scope="module")
def fresh():
    return caps.probe_all()


def _cells(matrix: dict):
    for part in ("families", "features"):
        for method, row in matrix[part].items():
            for col, cell in row.items():
                yield f"{part}/{method}/{col}", cell


@pytest.mark.slow
def test_no_probe_fails(fresh):
    assert [(k, c["note"]) for k, c in _cells(fresh) if c["status"] == "FAIL"] == []


@pytest.mark.slow
def test_committed_matrix_is_current(fresh):
    """If this fails, run `.venv/bin/python scripts/capabilities.py` and commit both files."""
    committed = render.load_matrix()
    changed = [
        (k, dict(_cells(committed)).get(k), c)
        for k, c in _cells(fresh)
        if dict(_cells(committed)).get(k) != c
    ]
    assert changed == [] and set(dict(_cells(committed))) == set(dict(_cells(fresh)))
    assert DOC.read_text(encoding="utf-8") == render.render(fresh)


def test_every_method_and_family_is_in_the_matrix():
    from slimtune.methods import METHODS, TRAINER
    from slimtune.models.families import FAMILIES

    matrix = render.load_matrix()
    trainers = {n for n, s in METHODS.items() if s.kind == TRAINER}
    assert set(matrix["families"]) == trainers | {"pema"} and set(matrix["features"]) == trainers
    assert all(set(row) == set(FAMILIES) for row in matrix["families"].values())


def test_list_matrix_prints_the_committed_table(capsys):
    assert main(["list", "--matrix"]) == 0
    assert capsys.readouterr().out == DOC.read_text(encoding="utf-8")


def test_a_refusal_is_recorded_with_its_one_line():
    cell = caps.probe_family("sat", "gpt_neox")
    assert cell.status == "no" and cell.note.startswith(
        "method sat: cannot slice GPTNeoXMLP (GPTNeoXForCausalLM)"
    )
    assert "\n" not in cell.note


def test_a_broken_method_is_a_failure(monkeypatch):
    """The probe can fail: a merge that silently drops the update is caught."""
    from slimtune.methods.baselines.apply import LoraAdapted

    monkeypatch.setattr(LoraAdapted, "merge", lambda self: self.model.get_base_model())
    cell = caps.probe_family("lora", "llama")
    assert cell.status == "FAIL" and "merged" in cell.note


def test_matrix_json_round_trips():
    assert json.loads(render.MATRIX_FILE.read_text()) == render.load_matrix()

"""The bad-input corpus (tests/cli/bad_inputs/*.yaml): every case is refused with one line on stderr naming the key,
file or line, exit code 2, no traceback, and no file that existed before is changed.

A case: ``argv`` for ``slimtune``; ``files`` to write first (text, ``{latin1: ...}`` for non-UTF-8 bytes,
``{repeat, times, prefix, suffix}`` for huge content); ``run: true`` for a copy of a trained tiny LoRA run at
``{run}`` (checkpoint, checkpoint-prev, final/); edits to it: ``replace``, ``flip`` (one byte), ``truncate``,
``remove``; ``copy_model`` for a copy of the tiny model; ``expect``: a substring of the error line.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from slimtune.cli import main
from slimtune.training import config as C

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = [case for f in sorted(CORPUS.glob("*.yaml")) for case in yaml.safe_load(f.read_text())]


def test_the_corpus_is_large_and_ids_are_unique():
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    from tests.conftest import write_jsonl

    tmp = tmp_path_factory.mktemp("trained")
    data = write_jsonl(
        tmp / "d.jsonl", [{"instruction": f"{a} + 3?", "input": "", "output": str(a + 3)} for a in range(12)]
    )
    run = tmp / "run"
    cfg = _good_config(tmp, tiny_model_dir, data, run)
    assert main(["train", str(cfg), "train.save_every=1"]) == 0
    assert (run / "checkpoint-prev").is_dir() and (run / "final").is_dir()
    return run


def _good_config(tmp: Path, model: Path, data: Path, out: Path) -> Path:
    raw = {
        "model": {"name": str(model)},
        "data": {"path": str(data), "max_length": 48, "eval_size": 4},
        "train": {
            "steps": 2,
            "batch_size": 4,
            "num_generations": 0,
            "eval_metric": False,
            "output_dir": str(out),
        },
        "method": {"name": "lora", "r": 4},
    }
    C.from_dict(raw)  # valid as it stands
    path = tmp / "good.yaml"
    path.write_text(yaml.safe_dump(raw))  # only these keys: a case's one mistake is its only problem
    return path


def _content(spec) -> bytes:
    if isinstance(spec, str):
        return spec.encode()
    if "latin1" in spec:
        return spec["latin1"].encode("latin-1")
    return (spec.get("prefix", "") + spec["repeat"] * spec["times"] + spec.get("suffix", "")).encode()


def _snapshot(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def _prepare(case: dict, tmp: Path, fill) -> None:
    for name, spec in (case.get("files") or {}).items():
        path = Path(fill(name)) if "{" in name else tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_content(spec))
    for name, (old, new) in (case.get("replace") or {}).items():
        path = Path(fill(name))
        text = path.read_text()
        assert old in text, f"{case['id']}: '{old}' not in {path}"
        path.write_text(text.replace(old, new, 1))
    for name in case.get("flip") or []:
        path = Path(fill(name))
        data = bytearray(path.read_bytes())
        data[len(data) * 2 // 3] ^= 0x01
        path.write_bytes(bytes(data))
    for name, size in (case.get("truncate") or {}).items():
        path = Path(fill(name))
        path.write_bytes(path.read_bytes()[:size])
    for name in case.get("remove") or []:
        path = Path(fill(name))
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, tiny_model_dir, instr_jsonl, request, capsys):
    places = {"tmp": str(tmp_path), "model": str(tiny_model_dir), "data": str(instr_jsonl)}
    _good_config(tmp_path, tiny_model_dir, instr_jsonl, tmp_path / "out-run")
    if case.get("run"):
        shutil.copytree(request.getfixturevalue("trained_run"), tmp_path / "run")
        places["run"] = str(tmp_path / "run")
    if case.get("copy_model"):
        shutil.copytree(tiny_model_dir, case["copy_model"].format(**places))

    def fill(text: str) -> str:
        return text.format(**places)

    _prepare(case, tmp_path, fill)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main([fill(a) for a in case["argv"]])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}: {err[-1500:]}"
    assert len(lines) == 1 and lines[0].startswith("slimtune: error: "), err[-1500:]
    assert case["expect"] in lines[0], lines[0]
    assert len(lines[0]) < 600, "the error line repeats the input"
    after = _snapshot(tmp_path)
    changed = [str(p) for p, h in before.items() if after.get(p) != h]
    assert not changed, f"changed or removed: {changed}"

"""As a new user would: a tiny model of a family the capability matrix does not list (Cohere: parallel
attention + MLP, LayerNorm without bias, a logit scale), saved with save_pretrained, trained with `slimtune
train` by every trainer method: it trains, or exits 2 with one line."""

from __future__ import annotations

import pytest
import yaml

from slimtune.cli import main
from slimtune.methods import METHODS, TRAINER
from slimtune.models.families import FAMILIES, tiny_model


@pytest.fixture(scope="module")
def cohere_dir(tmp_path_factory, tiny_tok):
    assert "cohere" not in FAMILIES
    d = tmp_path_factory.mktemp("cohere")
    ids = {k: getattr(tiny_tok, k) for k in ("pad_token_id", "eos_token_id", "bos_token_id")}
    tiny_model("cohere", vocab_size=len(tiny_tok), **ids).save_pretrained(d)
    tiny_tok.save_pretrained(d)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("method", [n for n, s in METHODS.items() if s.kind == TRAINER])
def test_trains_or_refuses_in_one_line(method, cohere_dir, instr_jsonl, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name": str(cohere_dir)},
        "data": {"path": str(instr_jsonl), "max_length": 64},
        "train": {"steps": 2, "batch_size": 4, "num_generations": 0, "output_dir": str(tmp_path / "run")},
        "method": {"name": method},
    }))  # fmt: skip
    code = main(["train", str(cfg)])
    out = capsys.readouterr()
    if code == 0:
        assert "after : eval loss" in out.out and (tmp_path / "run" / "results.json").is_file()
    else:
        lines = out.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("slimtune: error: "), out.err

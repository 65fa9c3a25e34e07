"""`slimtune export --format gguf`: llama.cpp's converter (make setup-extras) writes a .gguf that transformers
loads back offline with the merged model's logits (within the written type's rounding) and the gguf package's
reader accepts; methods that cannot merge refuse with one line. The converter is an optional extra: the cases
that run it skip when it is absent (`make test` installs it)."""

from __future__ import annotations

import json

import pytest
import torch

from slimtune.cli import main
from slimtune.models import gguf_export
from slimtune.models import loading as models
from slimtune.recipes import train as api
from tests.recipes.test_pipeline import run_cfg
from tests.registry import probe_settings, with_feature

needs_converter = pytest.mark.skipif(
    not (gguf_export.converter_dir() / "convert_hf_to_gguf.py").is_file(),
    reason="llama.cpp's converter is not installed (make setup-extras)",
)
# max |logit difference| allowed, as a fraction of the largest |logit|, per written tensor type
TOL = {"f32": 1e-6, "f16": 5e-3, "bf16": 2e-2, "q8_0": 3e-2}


def _round_trip(model, tok, tmp_path, quant: str, length: int = 12) -> tuple[float, float, dict]:
    from transformers import AutoModelForCausalLM

    hf = tmp_path / f"hf-{quant}"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    out = gguf_export.write_gguf(hf, tmp_path / f"m-{quant}.gguf", quant)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.randint(0, len(tok), (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, back(ids).logits
    return float((a - b).abs().max()), float(a.abs().max()), gguf_export.describe(out)


@pytest.fixture(scope="module")
def smol_tok():
    return models.load("smollm2-135m", "float32", device="cpu")[1]


@needs_converter
@pytest.mark.real
@pytest.mark.parametrize("quant", list(TOL))
def test_each_type_round_trips_a_tiny_llama(quant, smol_tok, tmp_path):
    from slimtune.models.families import tiny_model

    model = tiny_model("llama", vocab_size=len(smol_tok))
    diff, scale, facts = _round_trip(model, smol_tok, tmp_path, quant)
    assert facts["architecture"] == "llama" and facts["tensors"] > 0
    assert diff <= TOL[quant] * scale, f"{quant}: {diff:.3g} of {scale:.3g}"
    if quant != "f32":
        assert diff > 0  # the type really was written (and rounded)


@needs_converter
@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_round_trip(family, smol_tok, tmp_path):
    """Qwen2 with the real Qwen tokenizer (the converter identifies a tokenizer by its pre-tokenizer); Mistral
    with inputs no longer than its sliding window, which the converter does not carry (the export warns)."""
    from slimtune.models.families import tiny_model

    tok = smol_tok
    if family == "qwen2":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(models.model_path("qwen2.5-coder-0.5b"))
    model = tiny_model(family, vocab_size=len(tok))
    window = getattr(model.config, "sliding_window", None) or 12
    diff, scale, facts = _round_trip(model, tok, tmp_path, "f32", length=min(12, window))
    assert facts["tensors"] > 0
    assert diff <= TOL["f32"] * scale, f"{family}: {diff:.3g} of {scale:.3g}"


@pytest.fixture(scope="module")
def smol_tiny_dir(tmp_path_factory, smol_tok):
    """A tiny Llama directory with SmolLM2's real tokenizer (the converter identifies tokenizers it knows)."""
    from slimtune.models.families import tiny_model

    d = tmp_path_factory.mktemp("tiny-smol")
    tiny_model("llama", vocab_size=len(smol_tok)).save_pretrained(d)
    smol_tok.save_pretrained(d)
    return d


MERGING = {m: probe_settings(m) for m in with_feature("merge")}
"""Every method whose merge into a plain HF model the capability probes measured, with the probes' settings."""


@needs_converter
@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("method", list(MERGING))
def test_every_merging_method_exports_a_gguf_equal_to_its_merged_model(
    method, smol_tiny_dir, instr_jsonl, tmp_path, capsys
):
    from transformers import AutoModelForCausalLM

    from slimtune.methods import make_config

    run = tmp_path / "run"
    cfg = run_cfg(smol_tiny_dir, instr_jsonl, run, steps=2, num_generations=0, eval_metric=False)
    cfg.method = make_config(method, **MERGING[method])
    api.train(cfg)
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), "--format", "gguf", "--quant", "f32", "--out", str(out)]) == 0
    _, p = api.load_run(run)
    merged = p.adapted.merge().eval()
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.randint(0, len(p.tok), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = merged(ids).logits, back(ids).logits
    assert float((a - b).abs().max()) <= TOL["f32"] * float(a.abs().max())
    if method == "pst":  # the sparse export survives: half of each pruned matrix is exactly zero
        w = back.model.layers[0].mlp.up_proj.weight
        assert float((w == 0).float().mean()) >= 0.45


SHAREGPT = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"),
    ("Greece", "Athens"), ("Poland", "Warsaw"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Iran", "Tehran"),
    ("Austria", "Vienna"),
]  # fmt: skip


@needs_converter
@pytest.mark.real
@pytest.mark.slow
def test_a_sharegpt_lora_run_exports_a_gguf_that_answers_like_the_merged_model(tmp_path, capsys):
    """The new user's path: LoRA on SmolLM2 from a ShareGPT file, export to GGUF, load it with transformers
    offline and get the merged model's greedy answer."""
    from transformers import AutoModelForCausalLM

    data = tmp_path / "capitals.jsonl"
    rows = [
        {"conversations": [{"from": "human", "value": f"Capital of {c}?"}, {"from": "gpt", "value": f"{a}."}]}
        for c, a in SHAREGPT
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    cfg = run_cfg("smollm2-135m", data, run, steps=6, lr=1e-3, num_generations=0, eval_metric=False)
    cfg.data.eval_size = 4
    res = api.train(cfg)
    assert "sharegpt" in capsys.readouterr().out  # the format was recognised
    assert res["train_loss_last"] < res["train_loss_first"]
    out = tmp_path / "model.gguf"
    assert main(["export", str(run), "--format", "gguf", "--quant", "f16", "--out", str(out)]) == 0
    assert "loads with llama.cpp" in capsys.readouterr().out
    _, p = api.load_run(run)
    merged = p.adapted.merge().eval()
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    prompt = p.tok.apply_chat_template(
        [{"role": "user", "content": "Capital of Sweden?"}], tokenize=False, add_generation_prompt=True
    )
    ids = p.tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    answers = []
    for m in (merged, back):
        with torch.no_grad():
            gen = m.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=p.tok.eos_token_id)
        answers.append(p.tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    print("merged:", repr(answers[0]), "gguf:", repr(answers[1]))
    assert answers[0] == answers[1] and answers[0].strip()
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 2  # never overwrites


def test_a_method_that_cannot_merge_refuses_in_one_line(
    tiny_model_dir, instr_jsonl, tmp_path, monkeypatch, capsys
):
    fake = tmp_path / "llama.cpp"
    fake.mkdir()
    (fake / "convert_hf_to_gguf.py").write_text("raise SystemExit('must not run')\n")
    monkeypatch.setenv(gguf_export.ENV, str(fake))
    cfg = run_cfg(tiny_model_dir, instr_jsonl, tmp_path / "run", steps=1, num_generations=0)
    cfg.method = api.make_config("qst", r=4, backend="torch")
    api.train(cfg)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimtune: error: export: method 'qst' cannot be merged") and "\n" not in err
    assert not list((tmp_path / "run").glob("*.gguf"))


def test_a_missing_converter_names_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(gguf_export.ENV, str(tmp_path / "nowhere"))
    assert main(["export", str(tmp_path), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "llama.cpp's converter is not at" in err and "make setup-extras" in err

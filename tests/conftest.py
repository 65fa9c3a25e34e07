"""Shared fixtures: a tiny random Llama and a tiny real HF tokenizer, saved as an HF model directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "positive negative review movie film",
    "What is 12 + 30? Answer with the number only.",
    "Translate this English text to German.",
] * 20


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="session")
def tiny_tok():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tok) -> Path:
    """An HF model directory (config, safetensors, tokenizer) of a seeded tiny Llama."""
    from slimtune.models.loading import tiny_llama

    d = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(
        vocab_size=len(tiny_tok),
        pad_token_id=tiny_tok.pad_token_id,
        eos_token_id=tiny_tok.eos_token_id,
        bos_token_id=tiny_tok.bos_token_id,
    )
    model.save_pretrained(d)
    tiny_tok.save_pretrained(d)
    return d


@pytest.fixture
def tiny_model():
    from slimtune.models.loading import tiny_llama

    return tiny_llama(seed=0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def instr_jsonl(tmp_path) -> Path:
    rows = [
        {"instruction": f"What is {a} + {b}?", "input": "", "output": str(a + b)}
        for a in range(10, 22)
        for b in (3, 7)
    ]
    return write_jsonl(tmp_path / "train.jsonl", rows)


# the random-token batch of the capability probes, for the tests too
from slimtune.capabilities.probes import batch  # noqa: E402,F401
from slimtune.core import hostmem  # noqa: E402


def clean_env() -> dict[str, str]:
    """This environment without the settings importing slimtune made here and without a preloaded malloc or a
    choice of one (what a user's shell has)."""
    drop = ("LD_PRELOAD", hostmem.PRELOADED_ENV, hostmem.ALLOCATOR_ENV) + (
        (hostmem.THP_ENV,) if hostmem.applied else ()
    )
    return {k: v for k, v in os.environ.items() if k not in drop}


def expected_allocator() -> str:
    """The malloc a slimtune command gets on this machine (what is installed)."""
    env = hostmem.allocator_env(clean_env())
    return next((n for n in hostmem.ALLOCATORS if env and f"lib{n}" in env["LD_PRELOAD"]), "system")


# ---- test tiers: markers from what a test does, so `make test-fast` keeps the in-process unit tests
_PROCESS_WORDS = ("subprocess.", "Popen(", "torchrun", "_run(", "run_one(", "bench(", "_cli_process(")
_COMPILE_WORDS = ("compile=True", "train.compile", "compile_layers(", "torch.compile(")


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        fn = getattr(item, "function", None)
        if fn is None:
            continue
        try:
            src = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        module = item.module.__name__.rpartition(".")[2]
        if (module in ("test_distributed", "test_plan") and "_run(" in src) or "nproc" in src:
            item.add_marker(pytest.mark.multiprocess)
        elif module == "test_kill_resume" or any(w in src for w in _PROCESS_WORDS):
            item.add_marker(pytest.mark.subprocess)
        if module == "test_compile" or any(w in src for w in _COMPILE_WORDS):
            item.add_marker(pytest.mark.compile)


try:  # hypothesis profiles: the full suite explores more inputs than the fast tier
    from hypothesis import HealthCheck, settings

    _quiet = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    settings.register_profile("full", max_examples=150, **_quiet)
    settings.register_profile("fast", max_examples=15, **_quiet)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "full"))
except ImportError:  # (hypothesis comes with the dev extra)
    pass

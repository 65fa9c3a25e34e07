"""Training data: read JSONL/CSV/Parquet/saved HF datasets, render text | instruction | chat, mask prompt labels,
truncate (with a count), pad dynamically or pack, and iterate in a seeded, resumable order."""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimtune.core.errors import UserError
from slimtune.modules.losses import IGNORE

log = logging.getLogger(__name__)
FORMAT_FIELDS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "instruction": ("instruction", "output"),
    "text": ("text",),
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
"""ShareGPT ``from`` values and the chat role each becomes."""


# ---------------------------------------------------------------- reading files


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """``[(line_or_row_number, record)]`` from .jsonl/.json lines, .csv, .parquet, or a saved HF dataset dir."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"data.path '{path}': no such file or directory")
    if p.is_dir():
        try:
            from datasets import load_from_disk

            ds = load_from_disk(str(p))
        except Exception as err:
            raise UserError(
                f"data.path '{path}': not a saved HF dataset ({err.__class__.__name__}: {err})"
            ) from None
        if hasattr(ds, "keys"):  # DatasetDict: take 'train'
            if "train" not in ds:
                raise UserError(
                    f"data.path '{path}': DatasetDict has no 'train' split (has {list(ds.keys())})"
                )
            ds = ds["train"]
        return [(i + 1, dict(r)) for i, r in enumerate(ds)]
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(p, path)
    if suffix == ".csv":
        return _read_csv(p, path)
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"data.path '{path}': not a readable Parquet file ({str(err)[:200]})") from None
        return [(i + 1, r) for i, r in enumerate(table.to_pylist())]
    raise UserError(
        f"data.path '{path}': unsupported file type '{suffix}' (use .jsonl, .csv, .parquet or a dataset dir)"
    )


def _read_jsonl(p: Path, path) -> list[tuple[int, dict]]:
    out = []
    with p.open("rb") as fh:
        for i, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"data.path '{path}' line {i}: not UTF-8 text (byte {err.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"data.path '{path}' line {i}: invalid JSON ({err.msg})") from None
            if not isinstance(rec, dict):
                raise UserError(
                    f"data.path '{path}' line {i}: expected a JSON object, got {type(rec).__name__}"
                )
            out.append((i, rec))
    return out


CSV_FIELD_LIMIT = 1 << 26  # characters per field (the csv module's default, 128 KiB, refuses long documents)


def _read_csv(p: Path, path) -> list[tuple[int, dict]]:
    """Rows of a CSV with a header; a row with more fields than the header is refused (it would be lost)."""
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"data.path '{path}' line {line}: not UTF-8 text") from None
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    out = []
    try:
        for row in reader:
            if None in row:
                raise UserError(
                    f"data.path '{path}' line {reader.line_num}: {len(reader.fieldnames) + len(row[None])} "
                    f"fields where the header has {len(reader.fieldnames)}"
                )
            out.append((reader.line_num, dict(row)))
    except csv.Error as err:
        raise UserError(f"data.path '{path}' line {reader.line_num}: malformed CSV ({err})") from None
    return out


def detect_format(records: list[tuple[int, dict]], where: str) -> str:
    if not records:
        raise UserError(f"{where}: no records")
    first = records[0][1]
    for fmt, fields in FORMAT_FIELDS.items():
        if all(f in first for f in fields):
            return fmt
    raise UserError(
        f"{where} line {records[0][0]}: cannot tell the format from fields {sorted(first)} "
        "(need 'text', or 'instruction'+'output', or 'messages' (OpenAI style), or 'conversations' (ShareGPT))"
    )


# ---------------------------------------------------------------- rendering + tokenizing


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def instruction_prompt(tok, instruction: str, input_text: str = "") -> str:
    """The prompt text for an instruction record (chat template when the tokenizer has one)."""
    user = instruction if not input_text else f"{instruction}\n\n{input_text}"
    if has_chat_template(tok):
        return tok.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    return f"### Instruction:\n{user}\n\n### Response:\n"


def _field(rec: dict, name: str, where: str, line: int) -> str:
    if name not in rec or rec[name] is None:
        raise UserError(f"{where} line {line}: missing field '{name}'")
    value = rec[name]
    if not isinstance(value, str):
        raise UserError(f"{where} line {line}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def encode_record(tok, rec: dict, fmt: str, where: str, line: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` with labels = IGNORE on everything the model should not learn to produce."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if fmt == "text":
        ids = _ids(tok, _field(rec, "text", where, line)) + eos
        return ids, list(ids)
    if fmt == "instruction":
        instr = _field(rec, "instruction", where, line)
        inp = rec.get("input") or ""
        if not isinstance(inp, str):
            raise UserError(f"{where} line {line}: field 'input' must be a string, got {type(inp).__name__}")
        prompt = _ids(tok, instruction_prompt(tok, instr, inp))
        answer = _ids(tok, _field(rec, "output", where, line)) + eos
        return prompt + answer, [IGNORE] * len(prompt) + answer
    if fmt == "chat":
        return _encode_chat(tok, _messages(rec, where, line), where, line)
    if fmt == "sharegpt":
        return _encode_chat(tok, _sharegpt_messages(rec, where, line), where, line)
    raise UserError(f"data.format: {fmt!r} is not one of text, instruction, chat, sharegpt")


def _messages(rec: dict, where: str, line: int) -> list[dict]:
    """OpenAI-style ``messages``: a list of ``{"role", "content"}``."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where} line {line}: field 'messages' must be a non-empty list")
    for j, m in enumerate(msgs):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise UserError(f"{where} line {line}: messages[{j}] needs string fields 'role' and 'content'")
    return msgs


def _sharegpt_messages(rec: dict, where: str, line: int) -> list[dict]:
    """ShareGPT ``conversations`` (``{"from": human|gpt|system, "value"}``) as chat messages."""
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where} line {line}: field 'conversations' must be a non-empty list")
    msgs = []
    for j, t in enumerate(turns):
        if (
            not isinstance(t, dict)
            or not isinstance(t.get("from"), str)
            or not isinstance(t.get("value"), str)
        ):
            raise UserError(f"{where} line {line}: conversations[{j}] needs string fields 'from' and 'value'")
        role = SHAREGPT_ROLES.get(t["from"])
        if role is None:
            raise UserError(
                f"{where} line {line}: conversations[{j}].from is {t['from']!r}, not one of "
                f"{', '.join(SHAREGPT_ROLES)}"
            )
        msgs.append({"role": role, "content": t["value"]})
    return msgs


def _encode_chat(tok, msgs: list[dict], where: str, line: int) -> tuple[list[int], list[int]]:
    """Every turn through the chat template; only assistant turns are learned (their header is prompt), and the
    tokenizer's EOS ends the last assistant turn where the template does not put it there (a base model's
    template ending turns with another token), so the fine-tuned model learns to stop."""
    if not has_chat_template(tok):
        raise UserError(
            f"{where}: chat rows need a tokenizer with a chat template, and this model's has none: use an "
            "instruct model (or add `chat_template` to its tokenizer_config.json), or give the rows as "
            "data.format text or instruction"
        )
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # text already tokenized; the template must render each turn as a suffix of the previous text
    for k, m in enumerate(msgs):
        if m["role"] == "assistant":  # the assistant header is prompt, not target
            head = tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True) if k else ""
            done = _append(tok, ids, labels, done, head, learn=False, where=where, line=line)
        upto = tok.apply_chat_template(msgs[: k + 1], tokenize=False)
        done = _append(tok, ids, labels, done, upto, learn=m["role"] == "assistant", where=where, line=line)
    eos = tok.eos_token_id
    if eos is not None and msgs[-1]["role"] == "assistant" and eos not in ids[-3:]:
        ids.append(eos)
        labels.append(eos)
    return ids, labels


def _append(
    tok, ids: list[int], labels: list[int], done: str, text: str, learn: bool, where: str, line: int
) -> str:
    if not text.startswith(done):
        raise UserError(f"{where} line {line}: the chat template is not prefix-stable; use format 'text'")
    new = _ids(tok, text[len(done) :]) if len(text) > len(done) else []
    ids += new
    labels += new if learn else [IGNORE] * len(new)
    return text


# ---------------------------------------------------------------- datasets


@dataclass
class Encoded:
    """A tokenized dataset: parallel lists of ids and labels, plus how many rows were truncated."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_records(tok, records: list[tuple[int, dict]], fmt: str, max_length: int, where: str) -> Encoded:
    ids_all, labels_all, truncated = [], [], 0
    for line, rec in records:
        ids, labels = encode_record(tok, rec, fmt, where, line)
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(x == IGNORE for x in labels):
            continue  # nothing to learn after truncation
        ids_all.append(ids)
        labels_all.append(labels)
    if truncated:
        log.warning(
            "%s: %d of %d examples truncated to data.max_length=%d",
            where,
            truncated,
            len(records),
            max_length,
        )
    return Encoded(ids_all, labels_all, truncated)


def pack(enc: Encoded, max_length: int) -> Encoded:
    """Concatenate examples and cut into rows of exactly ``max_length`` (the last partial row is kept)."""
    flat_ids = [t for row in enc.input_ids for t in row]
    flat_labels = [t for row in enc.labels for t in row]
    ids = [flat_ids[i : i + max_length] for i in range(0, len(flat_ids), max_length)]
    labels = [flat_labels[i : i + max_length] for i in range(0, len(flat_labels), max_length)]
    return Encoded(ids, labels, enc.truncated)


def collate(
    rows: list[tuple[list[int], list[int]]], pad_id: int, pad_left: bool = False
) -> dict[str, torch.Tensor]:
    """Pad to the longest row in the batch (dynamic padding); labels on padding are IGNORE."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        sl = slice(width - len(ids), width) if pad_left else slice(0, len(ids))
        input_ids[i, sl] = torch.tensor(ids)
        labels[i, sl] = torch.tensor(lab)
        mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class BatchStream:
    """Endless batches over shuffled epochs; the order depends only on (seed, epoch), so a position resumes it."""

    def __init__(self, enc: Encoded, batch_size: int, pad_id: int, seed: int, rank: int = 0, world: int = 1):
        if len(enc) < batch_size * world:
            raise UserError(
                f"data: only {len(enc)} training examples for a batch of {batch_size} x {world} processes"
            )
        self.enc, self.batch_size, self.pad_id, self.seed = enc, batch_size, pad_id, seed
        self.rank, self.world = rank, world
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.enc)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._make_order()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        span = self.batch_size * self.world
        if self.index + span > len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._make_order()
        global_ids = self._order[self.index : self.index + span]
        self.index += span
        mine = global_ids[self.rank :: self.world]
        return collate([(self.enc.input_ids[i], self.enc.labels[i]) for i in mine], self.pad_id)


def load_split(cfg: Any, tok) -> tuple[Encoded, Encoded, list[dict], str]:
    """Tokenized (train, eval), the raw eval records (for metrics) and the format, from a DataConfig."""
    from slimtune.data.tasks import get_task

    if cfg.task:
        train_raw, eval_raw = get_task(cfg.task).load(cfg.seed)
        train_recs = [(i + 1, r) for i, r in enumerate(train_raw)]
        eval_recs = [(i + 1, r) for i, r in enumerate(eval_raw)]
        fmt, where, ewhere = "instruction", f"task '{cfg.task}'", f"task '{cfg.task}' (eval)"
    else:
        where = f"data.path '{cfg.path}'"
        train_recs = read_records(cfg.path)
        fmt = cfg.format if cfg.format != "auto" else detect_format(train_recs, where)
        if cfg.eval_path:
            ewhere = f"data.eval_path '{cfg.eval_path}'"
            eval_recs = read_records(cfg.eval_path)
        else:  # hold out a seeded 5% (at least 1) of the training file
            ewhere = where
            shuffled = list(train_recs)
            random.Random(cfg.seed).shuffle(shuffled)
            n_eval = max(1, len(shuffled) // 20) if len(shuffled) > 1 else 0
            eval_recs, train_recs = shuffled[:n_eval], shuffled[n_eval:]
    if cfg.train_size:
        train_recs = train_recs[: cfg.train_size]
    if cfg.eval_size:
        eval_recs = eval_recs[: cfg.eval_size]
    train = encode_records(tok, train_recs, fmt, cfg.max_length, where)
    if cfg.packing:
        train = pack(train, cfg.max_length)
    evald = encode_records(tok, eval_recs, fmt, cfg.max_length, ewhere)
    return train, evald, [r for _, r in eval_recs], fmt

import copy
import csv
import json

import pytest
import torch

from slimtune.core.errors import UserError
from slimtune.data.records import (
    IGNORE,
    BatchStream,
    Encoded,
    collate,
    detect_format,
    encode_record,
    encode_records,
    load_split,
    pack,
    read_records,
)
from slimtune.training.config import DataConfig
from tests.conftest import write_jsonl


def learned(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def test_instruction_masks_prompt(tiny_tok):
    ids, labels = encode_record(
        tiny_tok, {"instruction": "What is 12 + 30?", "output": "42"}, "instruction", "f", 1
    )
    assert len(ids) == len(labels)
    assert learned(tiny_tok, ids, labels) == "42<|im_end|>"
    assert labels[0] == IGNORE and tiny_tok.decode(ids).startswith("<|im_start|>user\nWhat is 12 + 30?")


def test_chat_learns_only_assistant_turns(tiny_tok):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "the fox"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "the dog"},
    ]
    ids, labels = encode_record(tiny_tok, {"messages": msgs}, "chat", "f", 1)
    assert tiny_tok.decode(ids) == tiny_tok.apply_chat_template(msgs, tokenize=False)
    assert learned(tiny_tok, ids, labels) == "the fox<|im_end|>\nthe dog<|im_end|>\n"


def test_sharegpt_rows_encode_as_the_same_chat(tiny_tok):
    turns = [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "the fox"},
        {"from": "human", "value": "more"},
        {"from": "gpt", "value": "the dog"},
    ]
    msgs = [
        {"role": {"system": "system", "human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
        for t in turns
    ]
    rec = {"conversations": turns}
    assert detect_format([(1, rec)], "f") == "sharegpt"
    assert detect_format([(1, {"messages": msgs})], "f") == "chat"
    assert encode_record(tiny_tok, rec, "sharegpt", "f", 1) == encode_record(
        tiny_tok, {"messages": msgs}, "chat", "f", 1
    )
    ids, labels = encode_record(tiny_tok, rec, "sharegpt", "f", 1)
    assert learned(tiny_tok, ids, labels) == "the fox<|im_end|>\nthe dog<|im_end|>\n"  # system/user masked


def test_a_template_that_ends_turns_without_eos_gets_eos_appended(tiny_tok):
    """A base model's template may close turns with a token that is not its EOS: the EOS is learned after the
    last assistant turn, so the fine-tuned model stops (the template's own EOS is not doubled: above)."""
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the fox"}]
    ids, labels = encode_record(tok, {"messages": msgs}, "chat", "f", 1)
    assert ids[-1] == labels[-1] == tok.eos_token_id
    assert ids.count(tok.eos_token_id) == 1


def test_chat_rows_without_a_chat_template_name_the_fix(tiny_tok):
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = None
    with pytest.raises(UserError, match="chat template.*instruct model.*data.format text or instruction"):
        encode_record(tok, {"conversations": [{"from": "human", "value": "x"}]}, "sharegpt", "f", 1)


def test_text_learns_everything(tiny_tok):
    ids, labels = encode_record(tiny_tok, {"text": "the lazy dog"}, "text", "f", 1)
    assert ids == labels and ids[-1] == tiny_tok.eos_token_id


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet", "dataset"])
def test_readers_agree(tmp_path, suffix):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    elif suffix == ".csv":
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(path))
    recs = read_records(path)
    assert [r for _, r in recs] == rows
    assert detect_format(recs, "x") == "instruction"


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(UserError, match=r"bad.jsonl' line 2: invalid JSON"):
        read_records(p)


def test_missing_field_names_line_and_field(tmp_path, tiny_tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(UserError, match=r"line 2: missing field 'output'"):
        encode_records(tiny_tok, read_records(p), "instruction", 64, f"data.path '{p}'")


def test_wrong_field_type(tiny_tok):
    with pytest.raises(UserError, match=r"line 3: field 'output' must be a string, got int"):
        encode_record(tiny_tok, {"instruction": "a", "output": 5}, "instruction", "f", 3)


def test_unknown_format_fields(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"question": "a"}])
    with pytest.raises(UserError, match="cannot tell the format"):
        detect_format(read_records(p), "data.path")


def test_truncation_counted(tiny_tok, caplog):
    recs = [(1, {"text": "the quick brown fox " * 20}), (2, {"text": "dog"})]
    enc = encode_records(tiny_tok, recs, "text", 16, "x")
    assert enc.truncated == 1 and max(len(r) for r in enc.input_ids) == 16
    assert "1 of 2 examples truncated" in caplog.text


def test_packing_fills_rows():
    enc = Encoded([[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[1, 2, 3], [-100, 5], [6, 7, 8, 9]])
    packed = pack(enc, 4)
    assert packed.input_ids == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert packed.labels == [[1, 2, 3, -100], [5, 6, 7, 8], [9]]


def test_collate_pads_dynamically_and_masks():
    b = collate([([5, 6, 7], [IGNORE, 6, 7]), ([8], [8])], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = collate([([5, 6, 7], [5, 6, 7]), ([8], [8])], pad_id=0, pad_left=True)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]


def test_stream_resumes_same_order():
    enc = Encoded([[i] for i in range(10)], [[i] for i in range(10)])
    a = BatchStream(enc, 3, 0, seed=1)
    seen = [next(a)["input_ids"].flatten().tolist() for _ in range(5)]  # crosses an epoch
    b = BatchStream(enc, 3, 0, seed=1)
    for _ in range(2):
        next(b)
    c = BatchStream(enc, 3, 0, seed=1)
    c.restore(b.state())
    assert [next(c)["input_ids"].flatten().tolist() for _ in range(3)] == seen[2:]
    assert sorted(sum(seen[:3], [])) == sorted(set(sum(seen[:3], [])))  # no repeats within an epoch


def test_stream_shards_across_ranks():
    enc = Encoded([[i] for i in range(8)], [[i] for i in range(8)])
    r0, r1 = BatchStream(enc, 2, 0, 0, rank=0, world=2), BatchStream(enc, 2, 0, 0, rank=1, world=2)
    got0, got1 = next(r0)["input_ids"].flatten().tolist(), next(r1)["input_ids"].flatten().tolist()
    assert not set(got0) & set(got1) and len(got0) == len(got1) == 2


def test_load_split_user_file_holds_out_eval(instr_jsonl, tiny_tok):
    cfg = DataConfig(path=str(instr_jsonl), max_length=64)
    train, evald, eval_records, fmt = load_split(cfg, tiny_tok)
    assert fmt == "instruction" and len(train) + len(evald) == 24 and len(evald) == 1
    assert eval_records[0]["output"] in {str(a + b) for a in range(10, 22) for b in (3, 7)}
    assert isinstance(train.input_ids[0][0], int) and torch.tensor(train.input_ids[0]).ndim == 1
    json.dumps(eval_records)

"""Property-based fuzzing of what users hand slimtune: any config dict, override list, YAML or data file either
parses or raises the one-line user error (``UserError`` / ``ConfigError``), never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimtune.core.errors import ConfigError, UserError
from slimtune.data.records import detect_format, encode_records, read_records
from slimtune.training import config as C

FUZZ = settings(
    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)  # examples: the profile (conftest)

KEYS = st.sampled_from(
    ["model", "data", "train", "method", "name", "steps", "lr", "r", "task", "path", "batch_size", "dtype",
     "max_length", "schedule", "on_nonfinite", "rate", "sparsity", "k", "trian", "", "x.y", "output_dir"]
)  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        ["lora", "full", "qlora", "meft", "qst", "sat", "pst", "pema", "sentiment", "bf16", "{time}"]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
CONFIGS = st.dictionaries(KEYS, VALUES, max_size=5) | st.fixed_dictionaries(
    {"method": st.dictionaries(KEYS, VALUES, max_size=4), "train": st.dictionaries(KEYS, VALUES, max_size=4)}
)


def _user_error_or_value(fn, *args):
    try:
        return fn(*args)
    except (UserError, ConfigError) as err:
        assert "\n" not in str(err) or isinstance(err, ConfigError), str(err)
        return err


@FUZZ
@given(CONFIGS)
def test_any_config_dict_parses_or_is_a_config_error(raw):
    _user_error_or_value(C.from_dict, raw)


@FUZZ
@given(st.lists(st.text(max_size=30), max_size=4))
def test_any_overrides_parse_or_are_a_user_error(items):
    result = _user_error_or_value(C.parse_overrides, items)
    if isinstance(result, dict):
        _user_error_or_value(C.from_dict, C.merge({"method": {"name": "lora"}}, result))


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_yaml_file_reads_or_is_a_user_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(data)
        _user_error_or_value(C.load_config, path)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)
RECORD_KEYS = st.sampled_from(["text", "instruction", "input", "output", "messages", "role", "content", "x"])
RECORDS = st.dictionaries(
    RECORD_KEYS, JSON_VALUES | st.lists(st.dictionaries(RECORD_KEYS, JSON_VALUES)), max_size=4
)


@pytest.fixture(scope="module")
def tok():
    from tests.conftest import build_tokenizer

    return build_tokenizer()


def _read_and_encode(path: Path, tok) -> None:
    records = read_records(path)
    fmt = detect_format(records, str(path))
    encode_records(tok, records, fmt, 32, str(path))


@FUZZ
@given(st.lists(RECORDS, max_size=4))
def test_any_jsonl_records_encode_or_are_a_user_error(tok, rows):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        _user_error_or_value(_read_and_encode, path, tok)


@FUZZ
@given(st.binary(max_size=400), st.sampled_from([".jsonl", ".csv", ".parquet", ".json"]))
def test_any_bytes_as_a_data_file_read_or_are_a_user_error(tok, data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d{suffix}"
        path.write_bytes(data)
        _user_error_or_value(_read_and_encode, path, tok)


@FUZZ
@given(st.lists(st.lists(st.text(max_size=8), min_size=1, max_size=4), min_size=1, max_size=5))
def test_any_csv_table_reads_or_is_a_user_error(tok, rows):
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.csv"
        path.write_text(buf.getvalue())
        _user_error_or_value(_read_and_encode, path, tok)

"""train.report_to: each tracker (accelerate's tracker classes, offline) receives the run's metrics; they are read
back from what each wrote. wandb and mlflow are optional extras: their cases skip when the package is absent
(`make test` installs them)."""

import json

import pytest

from slimtune.recipes import train as api
from slimtune.training.config import ConfigError, from_dict
from tests.recipes.test_pipeline import run_cfg


def _losses(run):
    return [
        r["loss"]
        for r in map(json.loads, (run / "logs" / "train.jsonl").read_text().splitlines())
        if "loss" in r
    ]


def _tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "logs" / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars("loss")]


def _wandb_records(path):
    """The protobuf records of a .wandb transaction log. wandb >= 0.2x reads these in its Go core only, so the
    test reads the documented container itself: a 7-byte header (":W&B", magic 0xBEE1, version), then LevelDB
    log blocks of 32 KiB, each record as crc32 (4) | length (2, little-endian) | type (1: full, 2/3/4:
    first/middle/last) | data."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", "not a W&B transaction log"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding
            continue
        parts = data if kind in (1, 2) else parts + data
        if kind in (1, 4):
            yield parts


def _wandb(run):
    """The offline run's logged losses, decoded from its .wandb log with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    (log,) = (run / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    out = []
    for data in _wandb_records(log):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            if "loss" in items:
                out.append(items["loss"])
    return out


def _mlflow(run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run / "logs" / "mlruns").resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "slimtune"]
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.data.params["method.name"] == "lora"  # the run's config is stored with it
    return [
        m.value for m in sorted(client.get_metric_history(mrun.info.run_id, "loss"), key=lambda m: m.step)
    ]


READERS = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow}


@pytest.mark.slow
@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow"])
def test_each_tracker_gets_the_logged_losses(tracker, tiny_model_dir, instr_jsonl, tmp_path, monkeypatch):
    pytest.importorskip({"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}[tracker])
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    api.train(run_cfg(tiny_model_dir, instr_jsonl, run, report_to=[tracker, "jsonl"], num_generations=0))
    assert len(_losses(run)) == 4
    assert READERS[tracker](run) == pytest.approx(_losses(run), rel=1e-6)


def test_an_unknown_tracker_is_one_config_error(tiny_model_dir, instr_jsonl, tmp_path):
    raw = run_cfg(tiny_model_dir, instr_jsonl, tmp_path / "r").to_dict()
    raw["train"]["report_to"] = ["tensorboard", "comet"]
    with pytest.raises(
        ConfigError, match="report_to.*'comet' is not one of tensorboard, wandb, mlflow, jsonl"
    ):
        from_dict(raw)

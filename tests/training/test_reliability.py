"""Faults a long run meets: torn and damaged checkpoints, a full disk, non-finite losses and gradients."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal

import pytest
import torch

from slimtune.capabilities.probes import SETTINGS, adapt, batch, trainer_for
from slimtune.core.errors import UserError
from slimtune.training.checkpoint import CKPT, MANIFEST, PREV, TMP, latest_checkpoint, load_checkpoint, verify
from slimtune.training.faults import EXIT_NONFINITE, RunStopped
from tests.registry import trainers

METHODS = [*trainers(), "pst-wanda"]
VARIANTS = {"pst-wanda": ("pst", {"score_prior": "wanda"})}  # input statistics gathered in the forward


def _trainer(method: str = "lora", steps: int = 6, **train):
    method, extra = VARIANTS.get(method, (method, {}))
    a = adapt(method, "llama", **extra)
    t = trainer_for(a, steps, SETTINGS[method][1], batch(b=4), batch_size=2, **train)
    t.model.train()
    return t


def _state(adapted) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in adapted.state_dict().items()}


def _same(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _two_checkpoints():
    t = _trainer()
    t.train_step()
    t.save_checkpoint()
    t.train_step()
    t.save_checkpoint()
    return t


# ---------------------------------------------------------------- checkpoints: manifest, rotation, fallback
def test_a_save_keeps_the_newest_two_and_verifies_them():
    t = _two_checkpoints()
    run = t.run_dir
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == [CKPT, PREV]
    for name, step in ((CKPT, 2), (PREV, 1)):
        manifest, why = verify(run / name)
        assert why is None and manifest["step"] == step and manifest["method"] == "lora"
        assert "method/adapter_model.safetensors" in manifest["files"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_warning(damage, caplog):
    t = _two_checkpoints()
    target = t.run_dir / CKPT / "method" / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 3]))
    else:
        target.unlink()
    with caplog.at_level(logging.WARNING):
        path, manifest = latest_checkpoint(t.run_dir)
    assert path.name == PREV and manifest["step"] == 1
    assert any(
        "adapter_model.safetensors" in r.getMessage() and CKPT in r.getMessage() for r in caplog.records
    )
    fresh = _trainer()
    state = load_checkpoint(t.run_dir, fresh.adapted, fresh.optimizer, fresh.scheduler)
    assert state["step"] == 1


def test_a_kill_between_the_renames_resumes_from_the_finished_copy():
    """Killed after checkpoint -> checkpoint-prev and before .checkpoint.tmp -> checkpoint: the tmp copy is
    complete (its manifest verifies) and newest."""
    t = _two_checkpoints()
    run = t.run_dir
    (run / CKPT).rename(run / TMP)
    path, manifest = latest_checkpoint(run)
    assert path.name == TMP and manifest["step"] == 2


def test_an_unfinished_write_is_discarded_silently(caplog):
    t = _two_checkpoints()
    shutil.copytree(t.run_dir / CKPT, t.run_dir / TMP)
    (t.run_dir / TMP / MANIFEST).unlink()  # killed before the manifest: not a checkpoint
    with caplog.at_level(logging.WARNING):
        path, _ = latest_checkpoint(t.run_dir)
    assert path.name == CKPT and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_no_good_checkpoint_left_is_one_line():
    t = _trainer()
    t.train_step()
    t.save_checkpoint()
    (t.run_dir / CKPT / "optimizer.pt").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match=r"optimizer\.pt has 10 bytes") as err:
        latest_checkpoint(t.run_dir)
    assert "\n" not in str(err.value)


def test_an_older_layout_is_named():
    t = _trainer()
    t.train_step()
    t.save_checkpoint()
    (t.run_dir / CKPT / MANIFEST).unlink()
    with pytest.raises(UserError, match="older slimtune"):
        latest_checkpoint(t.run_dir)


def test_a_checkpoint_of_another_method_or_model_is_refused():
    t = _trainer()
    t.identity["base_model"] = "model-a"
    t.train_step()
    t.save_checkpoint()
    fresh = _trainer()
    with pytest.raises(UserError, match="base_model is 'model-a', this run's config says 'model-b'"):
        load_checkpoint(t.run_dir, fresh.adapted, fresh.optimizer, fresh.scheduler, {"base_model": "model-b"})
    other = _trainer("full")
    with pytest.raises(UserError, match="holds the state of method 'lora', not of 'full'"):
        load_checkpoint(t.run_dir, other.adapted, other.optimizer, other.scheduler)
    wider = adapt("lora", "llama", r=8)
    with pytest.raises(UserError, match=r"another shape \(e\.g\. .*lora_A.*\(4, 64\) vs \(8, 64\)"):
        wider.load(t.run_dir / CKPT / "method")


# ---------------------------------------------------------------- a failed write keeps the previous one
def test_disk_full_during_a_save_keeps_the_previous_checkpoint():
    """RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG), as a full disk or a quota does; no
    root needed. The failed save names the path, removes its partial copy and leaves the last one usable."""
    t = _trainer("full")
    t.train_step()
    t.save_checkpoint()
    before = {p.name: p.read_bytes() for p in (t.run_dir / CKPT).iterdir() if p.is_file()}
    t.train_step()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a fatal signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(UserError) as err:
            t.save_checkpoint()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    msg = str(err.value)
    assert (
        "cannot write" in msg and str(t.run_dir) in msg and "previous checkpoint" in msg and "\n" not in msg
    )
    assert not (t.run_dir / TMP).exists()
    assert {p.name: p.read_bytes() for p in (t.run_dir / CKPT).iterdir() if p.is_file()} == before
    assert verify(t.run_dir / CKPT)[0]["step"] == 1


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes into a read-only directory anyway (CI runs as root)"
)
def test_a_read_only_run_directory_keeps_the_previous_checkpoint():
    t = _trainer("lora")
    t.train_step()
    t.save_checkpoint()
    t.train_step()
    t.run_dir.chmod(0o500)
    try:
        with pytest.raises(UserError, match="cannot write .*previous checkpoint .* is intact"):
            t.save_checkpoint()
    finally:
        t.run_dir.chmod(0o700)
    assert verify(t.run_dir / CKPT)[0]["step"] == 1


# ---------------------------------------------------------------- non-finite loss and gradient
def _poison_grad(adapted, at_step: int, prefix: str = ""):
    """After the backward of step ``at_step`` (0-based), one gradient entry that is in use (of the first tensor
    whose name starts with ``prefix``) becomes NaN."""
    real = adapted.after_backward

    def after_backward(step):
        real(step)
        if step != at_step:
            return
        for name, p in adapted.named_trainable_parameters():
            if name.startswith(prefix) and p.grad is not None and p.grad.abs().sum() > 0:
                i = int(p.grad.flatten().abs().argmax())
                p.grad.view(-1)[i] = float("nan")
                return
        raise AssertionError("no gradient to poison")

    adapted.after_backward = after_backward


def _poison_batch(model, trainer, at_step: int):
    """The forward of step ``at_step`` sees NaN hidden states (as a corrupt input embedding would give)."""

    def hook(module, args, output):
        return output * float("nan") if trainer.step == at_step else output

    embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return embedding.register_forward_hook(hook)


def _trained(adapted) -> dict[str, torch.Tensor]:
    """What a step may change: the trainable tensors and the method's step state (not schedule buffers)."""
    out = {n: p.detach().clone() for n, p in adapted.named_trainable_parameters()}
    return out | {f"step_state.{i}": t.clone() for i, t in enumerate(adapted.step_state())}


@pytest.mark.parametrize("fault", ["grad", "batch"])
@pytest.mark.parametrize("method", METHODS)
def test_a_nonfinite_step_is_skipped(method, fault):
    t = _trainer(method)
    t.train_step()
    if fault == "grad":
        _poison_grad(t.adapted, 1)
    else:
        _poison_batch(t.adapted.model, t, 1)
    before = _trained(t.adapted)
    t.train_step()
    assert t.skipped == 1 and t.step == 2
    assert _same(_trained(t.adapted), before), "a skipped step changed the trained state"
    t.train_step()
    after = _trained(t.adapted)
    assert not _same(after, before) and all(torch.isfinite(v).all() for v in after.values())
    logged = [json.loads(x) for x in (t.run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "nonfinite" in r] == [2]


def test_meft_skips_a_nonfinite_host_row_gradient():
    """The NaN sits in a touched row of MEFT's host store (updated by its own lazy Adam, not the optimizer)."""
    t = _trainer("meft")
    t.train_step()
    _poison_grad(t.adapted, 1, prefix="meft_store.")
    before = _trained(t.adapted)
    t.train_step()
    assert t.skipped == 1 and _same(_trained(t.adapted), before)


@pytest.mark.parametrize("method", ["lora", "meft", "pst"])
def test_stop_saves_the_last_good_state_and_exits_3(method):
    t = _trainer(method, on_nonfinite="stop")
    t.train_step()
    good = _state(t.adapted)
    _poison_grad(t.adapted, 1)
    with pytest.raises(RunStopped, match="step 2: non-finite gradient of .*train.on_nonfinite: stop") as err:
        t.train_step()
    assert err.value.exit_code == EXIT_NONFINITE
    fresh = _trainer(method)
    state = load_checkpoint(t.run_dir, fresh.adapted, fresh.optimizer, fresh.scheduler)
    assert state["step"] == 1 and state["data"] == {"epoch": 0, "index": 2}
    assert _same(_state(fresh.adapted), good)


def test_ten_skips_in_a_row_stop_the_run():
    t = _trainer("lora", steps=20)
    t.adapted.model.get_input_embeddings().register_forward_hook(lambda m, a, out: out * float("nan"))
    for _ in range(9):
        t.train_step()
    assert t.skipped == 9
    with pytest.raises(RunStopped, match="10 non-finite steps in a row"):
        t.train_step()


# ---------------------------------------------------------------- no pickle from user files
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unpickling_calls(source: str, filename: str = "<src>") -> list[str]:
    """Where ``source`` imports a pickle-like module, calls ``torch.load`` without ``weights_only=True``,
    ``numpy.load(allow_pickle=True)`` or ``pandas.read_pickle``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{where} imports {n}" for n in names if n and n.split(".")[0] in PICKLE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name.endswith("torch.load") or name == "load" and "weights_only" in kw:
            if kw.get("weights_only") != "True":
                found.append(f"{where} {name} without weights_only=True")
        if name.split(".")[-1] == "load" and kw.get("allow_pickle") not in (None, "False"):
            found.append(f"{where} {name}(allow_pickle=...)")
        if name.split(".")[-1] == "read_pickle":
            found.append(f"{where} {name}")
    return found


def test_no_pickle_is_loaded_anywhere_in_the_source():
    from pathlib import Path

    import slimtune

    root = Path(slimtune.__file__).parent
    found = [hit for f in sorted(root.rglob("*.py")) for hit in unpickling_calls(f.read_text(), str(f))]
    assert not found, found


def test_the_pickle_check_finds_each_pattern():
    bad = (
        "import pickle\nfrom joblib import load\nimport torch, numpy as np, pandas as pd\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
        "pd.read_pickle('x')\n"
    )
    assert len(unpickling_calls(bad)) == 6
    assert (
        unpickling_calls("import torch\ntorch.load('x', weights_only=True)\nimport numpy\nnumpy.load('x')\n")
        == []
    )


def test_under_fp16_loss_scaling_gradient_overflow_is_left_to_the_scaler(monkeypatch):
    """An inf gradient under a GradScaler is its cue to lower the scale (it skips that step itself); counting it
    as a fault would stop every fp16 run after ten overflows. A non-finite loss still counts."""
    t = _trainer("lora")
    t.micro_step(next(t.stream), last=True)
    p = next(p for _, p in t.adapted.named_trainable_parameters() if p.grad is not None)
    p.grad.view(-1)[0] = float("inf")
    assert t.nonfinite.find(t.adapted, [1.0]).startswith("gradient of ")
    monkeypatch.setattr(t.acc, "scaler", object(), raising=False)
    assert t.nonfinite.find(t.adapted, [1.0]) is None
    assert t.nonfinite.find(t.adapted, [float("nan")]) == "loss nan"

"""Placement of loaded models, RNG states restored in device order, RSS read by psutil."""

from __future__ import annotations

from pathlib import Path

import torch

from slimtune.core import memory
from slimtune.methods import apply, make_config
from slimtune.models import loading as models
from slimtune.recipes import train as api
from slimtune.training.checkpoint import load_checkpoint, save_checkpoint


def test_load_places_the_model_on_the_device(tiny_model_dir):
    model, _ = models.load(str(tiny_model_dir), "fp32", device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    model, _ = models.load(str(tiny_model_dir), "fp32", device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_eval_generate_and_export_load_on_the_default_device(tiny_model_dir, monkeypatch):
    """`slimtune eval / generate / export` go through api.load_target / load_run: the model lands on
    models.default_device() (CUDA when present), not on the CPU regardless."""
    monkeypatch.setattr(models, "default_device", lambda: "meta")
    _, p = api.load_target(None, str(tiny_model_dir))
    assert {t.device.type for t in p.adapted.model.parameters()} == {"meta"}


def test_cuda_rng_states_are_restored_in_device_order(tmp_path, monkeypatch):
    """Regression: states were ordered by sorted() on names, which puts cuda10 before cuda2."""
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(12)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: restored.extend(s))
    adapted = apply(models.tiny_llama(), make_config("full"))
    opt = torch.optim.AdamW(adapted.trainable_parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(Path(tmp_path), adapted, opt, sched, {"step": 0})
    load_checkpoint(Path(tmp_path), adapted, opt, sched)
    assert [int(s[0]) for s in restored] == list(range(12))


def test_current_rss_is_the_process_rss():
    status = Path("/proc/self/status")
    rss = memory.current_rss_bytes()
    if status.is_file():
        vm = next(
            int(line.split()[1]) * 1024
            for line in status.read_text().splitlines()
            if line.startswith("VmRSS")
        )
        assert abs(rss - vm) < 64 * 2**20  # read at nearly the same time
    assert rss > 10 * 2**20

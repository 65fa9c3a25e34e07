"""Every tensor a method creates while it trains, evaluates or generates follows the model's device.

There is no GPU here, so wrong-device tensors are caught another way: while a method runs (the trainer's steps,
evaluation, generation), every torch factory call (zeros, arange, tensor, full, ...) made directly from
slimtune's code without a ``device=`` is recorded; on a CUDA machine such a tensor would land on the CPU. The
deliberate host-side work is listed in HOST (MEFT's host store and its selection, SAT's CPU selection generator).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from slimtune.capabilities import probes as caps

SRC = Path(__file__).resolve().parents[2] / "src" / "slimtune"
FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor, torch.randn, torch.rand,
    torch.randint, torch.randperm, torch.eye, torch.linspace, torch.as_tensor,
}  # fmt: skip
HOST = {
    # batches are built on the host; the trainer moves each one to the model's device
    ("data/records.py", "collate"),
    # MEFT keeps keys/values, their moments and the selection on the host by design; only slices travel
    ("methods/meft/layer.py", "select_topk"),
    ("methods/meft/layer.py", "union_rows"),
    ("methods/meft/store.py", "add_grad"),
    ("methods/meft/store.py", "adam_step"),
    # SAT samples the kept set on the CPU with a seeded generator, then moves the indices to the scores' device
    ("methods/sat/apply.py", "_generator"),
}


class HostFactories(TorchFunctionMode):
    """Records (file, function, line) of factory calls from slimtune's own code that give no device."""

    def __init__(self):
        super().__init__()
        self.found: set[tuple[str, str, int]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            path = Path(frame.f_code.co_filename)
            if SRC in path.parents:
                self.found.add((str(path.relative_to(SRC)), frame.f_code.co_name, frame.f_lineno))
        return func(*args, **kwargs)


@pytest.mark.parametrize("method", list(caps.SETTINGS))
def test_tensors_created_while_running_follow_the_model(method):
    a = caps.adapt(method, "llama")
    data, lr = caps.batch(), caps.SETTINGS[method][1]
    trainer = caps.trainer_for(a, 2, lr, data)
    trainer.model.train()
    with HostFactories() as mode:
        trainer.train_step()
        trainer.train_step()
        a.model.eval()
        with torch.no_grad():
            a.model(**data)
        a.generate(data["input_ids"][:, :5], data["attention_mask"][:, :5], 3, None, 0)
    wrong = sorted(f"{f}:{line} ({fn})" for f, fn, line in mode.found if (f, fn) not in HOST)
    assert wrong == []


def test_the_detector_sees_a_host_tensor():
    from slimtune.data.records import collate
    from slimtune.modules.losses import frozen_head_cross_entropy

    with HostFactories() as mode:
        torch.zeros(3)  # from this test file: not slimtune's code, not recorded
        frozen_head_cross_entropy(
            torch.randn(1, 4, 8), torch.randn(10, 8), torch.zeros(1, 4, dtype=torch.long)
        )
        collate([([5, 6, 7], [5, 6, 7])], pad_id=0)  # builds the batch on the host (the trainer moves it)
    assert {(f, fn) for f, fn, _ in mode.found} == {("data/records.py", "collate")}

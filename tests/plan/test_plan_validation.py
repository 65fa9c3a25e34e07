"""The planner against committed measurements of every trainer method (`slimtune bench`, which measured each run
and traced it), fp32 on this CPU (2 threads):
- SmolLM2-135M (the real model), 4 x 256: `benchmarks/results/2026-12-02-cpu-smollm2-plan/`;
- the smollm2-360m shape (random weights), 2 x 128: `benchmarks/results/2026-12-05-cpu-smollm2-360m-plan/`;
- the tinyllama-1.1b shape, 1 x 64: `benchmarks/results/2026-12-05-cpu-tinyllama-1.1b-plan/`.

Re-traced here with today's code, so a change to a method or to the planner that moves a prediction away from
what was measured fails this test. Bands, per role (docs/plan.md):
- trainable, gradients and optimizer state: equal to the bytes measured at the same point of the real step;
- the total (traced tensors + the runtime's RSS) against the measured peak RSS: within the band each method's
  measurements span on this CPU (``BANDS``). The 10% goal holds for full fine-tuning and SAT only: glibc keeps
  freed heap that RSS counts and no tensor holds (under-prediction), MEFT's dynamic selections are planned at
  their upper bound (over-prediction); see docs/plan.md.
"""

import json
from pathlib import Path

import pytest
import torch

from slimtune.methods import make_config
from slimtune.models.shapes import shape_config
from slimtune.plan.report import agreement
from slimtune.plan.trace import trace_step

RESULTS = Path(__file__).parents[2] / "benchmarks/results"
MEASURED = [
    "2026-12-02-cpu-smollm2-plan",
    "2026-12-05-cpu-smollm2-360m-plan",
    "2026-12-05-cpu-tinyllama-1.1b-plan",
]
AT_MEASUREMENT = {"2026-12-02-cpu-smollm2-plan": {"lora": {"dropout": 0.05}, "qlora": {"dropout": 0.05}}}
"""Defaults of a measured commit that have changed since: at 3c58d42 LoRA's dropout was 0.05 and the loss was the
model's own (the chunked loss came later), so those runs are re-traced as they were measured."""
CHUNKED_LOSS = {"2026-12-02-cpu-smollm2-plan": False}

BANDS = {
    "full": (-0.12, 0.05),
    "sat": (-0.12, 0.05),
    "lora": (-0.25, 0.05),
    "qlora": (-0.30, 0.05),
    "qst": (-0.20, 0.05),
    "pst": (-0.52, 0.05),
    "meft": (0.10, 0.45),
}
"""error = predicted / measured - 1, per method: the span of its measurements above, rounded out (PST: the
process's heap and kernel workspaces grow with the model, not its tensors; docs/plan.md)."""


def _cases():
    for name in MEASURED:
        data = json.loads((RESULTS / name / "results.json").read_text())
        for run in data["runs"]:
            marks = [ALLOCATOR_GAP] if (name, run["method"]) == ("2026-12-02-cpu-smollm2-plan", "qst") else []
            yield pytest.param(
                name, data["meta"], run, marks=marks, id=f"{data['meta']['model']}-{run['method']}"
            )


ALLOCATOR_GAP = pytest.mark.xfail(
    strict=True,
    reason="QST's traced tensors (0.83 GB) are 52% below the RSS measured for it (1.71 GB) since the planner stopped "
    "tracing memory under FlopCounterMode, whose hooks had kept the backbone's activations alive; the gap is heap "
    "glibc keeps (docs/memory.md: 3.45 -> 1.83 GB RSS with MALLOC_MMAP_THRESHOLD_). Strict: passes again only "
    "when a re-measurement or the planner closes it",
)


MEASURED_BEFORE_ACTIVATIONS = set(MEASURED)
"""Measured before the decoder layers kept fewer activations (slimtune/modules/activations.py: the gated MLP's two-tensor
backward, checkpointed RMSNorms) and before the trainer's forwards stopped building a KV cache: re-traced with
neither, as they were measured."""


@pytest.mark.slow
@pytest.mark.parametrize("name, meta, run", list(_cases()))
def test_prediction_keeps_agreeing_with_the_measurement(name, meta, run, monkeypatch):
    if name in MEASURED_BEFORE_ACTIVATIONS:
        import slimtune.methods
        import slimtune.training.setup

        monkeypatch.setattr(slimtune.methods, "keep_fewer_activations", lambda model: 0)
        monkeypatch.setattr(slimtune.training.setup, "_builds_a_cache", lambda model: False)
    settings = {k: v for k, v in run["settings"].items() if k not in ("baseline", "lr")}
    method = run["method"]
    t = trace_step(
        shape_config(meta["shape"] or meta["model"]),
        make_config(method, **{**AT_MEASUREMENT.get(name, {}).get(method, {}), **settings}),
        meta["batch"],
        meta["seq_len"],
        torch.float32,
        chunked_loss=CHUNKED_LOSS.get(name, True),
        fused_adamw=False,  # every run here was measured with AdamW's default (foreach) step
    )
    measured = run["memory_by_role"]
    assert t.trainable_bytes == measured["trainable"]
    assert t.at_grads["gradients"] == measured["gradients"]
    assert t.at_grads["optimizer"] == measured["optimizer"]
    fresh = {**run, "plan": {**run["plan"], "tensor_peak_bytes": t.total, "at_grads": t.at_grads,
                             "trainable_bytes": t.trainable_bytes}}  # fmt: skip
    a = agreement(fresh)
    low, high = BANDS[method]
    assert low <= a["error"] <= high, a

"""The planner against the committed measurement of every trainer method on SmolLM2-135M (4 x 256, fp32, CPU):
`benchmarks/results/2026-12-02-cpu-smollm2-plan/` (`slimtune bench`, which measured each run and traced it).

Re-traced here with today's code, so a change to a method or to the planner that moves a prediction away from
what was measured fails this test. Bands, per role (docs/plan.md):
- trainable, gradients and optimizer state: equal to the bytes measured at the same point of the real step;
- the total (traced tensors + the runtime's RSS) against the measured peak RSS: within the band measured on this
  CPU, -30% .. +20% (glibc keeps freed heap that RSS counts and tensors do not; MEFT's dynamic selections are
  planned at their upper bound). The 10% goal is met by full and SAT only; see docs/plan.md.
"""

import json
from pathlib import Path

import pytest
import torch

from slimtune.bench.shapes import shape_config
from slimtune.methods import make_config
from slimtune.plan.report import agreement
from slimtune.plan.trace import trace_step

RESULTS = Path(__file__).parent.parent / "benchmarks/results/2026-12-02-cpu-smollm2-plan/results.json"
RUNS = {r["method"]: r for r in json.loads(RESULTS.read_text())["runs"]}
AT_MEASUREMENT = {"lora": {"dropout": 0.05}, "qlora": {"dropout": 0.05}}
"""Defaults of the measured commit (3c58d42) that have changed since: LoRA's dropout was 0.05, and the loss was
the model's own (the chunked loss came later), so both are re-traced as they were measured."""


ALLOCATOR_GAP = pytest.mark.xfail(
    strict=True,
    reason="QST's traced tensors (0.83 GB) are 52% below the RSS measured for it (1.71 GB) since the planner stopped "
    "tracing memory under FlopCounterMode, whose hooks had kept the backbone's activations alive; the gap is heap "
    "glibc keeps (docs/memory.md: 3.45 -> 1.83 GB RSS with MALLOC_MMAP_THRESHOLD_). Strict: passes again only "
    "when a re-measurement or the planner closes it",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=ALLOCATOR_GAP) if m == "qst" else m for m in sorted(RUNS)]
)
def test_prediction_keeps_agreeing_with_the_measurement(method):
    run = RUNS[method]
    meta = json.loads(RESULTS.read_text())["meta"]
    settings = {k: v for k, v in run["settings"].items() if k not in ("baseline", "lr")}
    t = trace_step(
        shape_config("smollm2-135m"),
        make_config(method, **{**AT_MEASUREMENT.get(method, {}), **settings}),
        meta["batch"],
        meta["seq_len"],
        torch.float32,
        chunked_loss=False,
    )
    measured = run["memory_by_role"]
    assert t.trainable_bytes == measured["trainable"]
    assert t.at_grads["gradients"] == measured["gradients"]
    assert t.at_grads["optimizer"] == measured["optimizer"]
    fresh = {**run, "plan": {**run["plan"], "tensor_peak_bytes": t.total, "at_grads": t.at_grads,
                             "trainable_bytes": t.trainable_bytes}}  # fmt: skip
    a = agreement(fresh)
    assert -0.30 <= a["error"] <= 0.20, a

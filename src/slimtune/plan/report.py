"""Plans as rows: bytes by role, the device overhead, whether it fits a budget, and the table a person reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from slimtune.plan.gpus import ALLOCATOR_SHARE, CUDA_CONTEXT, GPU
from slimtune.plan.trace import Trace

COLUMNS = (
    ("frozen", "frozen weights"),
    ("trainable", "trainable"),
    ("gradients", "gradients"),
    ("optimizer", "optimizer"),
    ("activations", "activations"),
    ("temporaries", "temporaries"),
    ("overhead", "overhead"),
    ("total", "total"),
)


@dataclass
class PlanRow:
    """One method at one batch and sequence length (bytes)."""

    method: str
    batch: int
    seq_len: int
    frozen: int
    trainable: int
    buffers: int
    gradients: int
    optimizer: int
    activations: int
    temporaries: int
    overhead: int
    host: int
    total: int
    step_seconds: float | None
    flops: int
    budget: int | None = None
    largest_batch: int | None = None
    largest_seq_len: int | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    @property
    def headroom(self) -> int | None:
        return None if self.budget is None else self.budget - self.total

    def to_json(self) -> dict:
        return {**asdict(self), "fits": self.fits, "headroom": self.headroom}


def overhead_bytes(tensor_peak: int, gpu: bool) -> int:
    """What a process holds beyond its tensors: on a GPU the CUDA context and the caching allocator's share
    (``plan.gpus``); none is added for the host (the CPU validation compares tensor bytes with tensor bytes)."""
    return CUDA_CONTEXT + int(ALLOCATOR_SHARE * tensor_peak) if gpu else 0


def roofline_seconds(trace: Trace, gpu: GPU | None) -> float | None:
    """A compute-bound lower bound on the step time: the step's FLOPs at the GPU's dense bf16 peak."""
    if gpu is None or not trace.flops:
        return None
    return trace.flops / (gpu.tflops * 1e12)


def row_from_trace(trace: Trace, batch: int, seq_len: int, budget: int | None, gpu: GPU | None) -> PlanRow:
    peak = trace.peak
    tensors = trace.total
    over = overhead_bytes(tensors, budget is not None)
    # the tracker files 4-bit codes as buffers; the method's report counts them as frozen weights
    rest = peak["parameters"] + peak["buffers"] - trace.frozen_bytes - trace.trainable_bytes
    return PlanRow(
        method=trace.method,
        batch=batch,
        seq_len=seq_len,
        frozen=trace.frozen_bytes,
        trainable=trace.trainable_bytes,
        buffers=max(rest, 0),
        gradients=peak["gradients"],
        optimizer=peak["optimizer"],
        activations=peak["activations"],
        temporaries=peak["temporaries"],
        overhead=over,
        host=trace.host_bytes,
        total=tensors + over,
        step_seconds=roofline_seconds(trace, gpu),
        flops=trace.flops,
        budget=budget,
    )


def _gib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**30:.2f}"


def render(rows: list[PlanRow], title: str) -> str:
    head = ["method", "batch x seq"] + [label for _, label in COLUMNS] + ["host", "fits", "headroom"]
    head += ["largest batch", "largest seq", "step (roofline)"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, f"{r.batch} x {r.seq_len}"] + [_gib(getattr(r, key)) for key, _ in COLUMNS]
        fits = "" if r.fits is None else ("yes" if r.fits else "NO")
        cells += [_gib(r.host), fits, _gib(r.headroom)]
        cells += [str(r.largest_batch or ""), str(r.largest_seq_len or "")]
        cells += ["" if r.step_seconds is None else f"{r.step_seconds:.2f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "GiB. Tensor bytes at the traced step's peak (MemTracker on fake tensors); overhead: CUDA context and",
        "allocator share when a GPU budget is given; host: method state kept in host memory (MEFT's store).",
    ]
    return "\n".join(lines)


ROLE_PAIRS = ("trainable", "gradients", "optimizer")


def agreement(run: dict) -> dict | None:
    """Predicted vs measured for one `slimtune bench` run (its ``plan`` entry beside its measurement).

    On CPU the measured peak is the process's peak RSS, so the prediction adds the runtime's RSS (Python and the
    libraries, measured in the same process before the model loads) to the traced tensor peak; on CUDA both
    sides are tensor bytes (``max_memory_allocated``). Roles compare the tracker's bytes once the gradients exist
    with the library's accounting at the same point of the last measured step.
    """
    plan = run.get("plan") or {}
    if not run.get("ok") or "tensor_peak_bytes" not in plan:
        return None
    cuda = run.get("cuda_peak_allocated_bytes") is not None
    predicted = plan["tensor_peak_bytes"] + (0 if cuda else run.get("runtime_rss_bytes", 0))
    measured = run["peak_bytes"]
    roles = run.get("memory_by_role", {})
    return {
        "predicted": predicted,
        "measured": measured,
        "error": predicted / measured - 1,
        "trainable": (plan["trainable_bytes"], roles.get("trainable", 0)),
        "gradients": (plan["at_grads"].get("gradients", 0), roles.get("gradients", 0)),
        "optimizer": (plan["at_grads"].get("optimizer", 0), roles.get("optimizer", 0)),
    }


def agreement_lines(results: dict) -> list[str]:
    rows = [(r["label"], agreement(r), r.get("plan", {}).get("error")) for r in results["runs"]]
    if not any(a or e for _, a, e in rows):
        return []
    lines = [
        "",
        "`slimtune plan`'s prediction beside the measurement (GB; CPU: traced tensors + the runtime's RSS; "
        "trainable / gradients / optimizer: predicted / measured):",
        "",
        "| run | predicted peak | measured peak | error | trainable | gradients | optimizer |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, a, err in rows:
        if err:
            lines.append(f"| {label} | planner failed: {err} | | | | | |")
        elif a:
            pairs = " | ".join(f"{a[k][0] / 1e9:.3f} / {a[k][1] / 1e9:.3f}" for k in ROLE_PAIRS)
            lines.append(
                f"| {label} | {a['predicted'] / 1e9:.2f} | {a['measured'] / 1e9:.2f} | {a['error']:+.1%} | {pairs} |"
            )
    return lines

"""`slimtune plan`: each method's peak memory for any model, batch and sequence length, traced from the real
training step on fake tensors (``plan.trace``), against a GPU budget (``plan.gpus``), as a table (``plan.report``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimtune.core.errors import UserError
from slimtune.plan.gpus import GPU, parse_budget
from slimtune.plan.report import PlanRow, row_from_trace
from slimtune.plan.trace import trace_step

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_config(model: str | None = None, shape: str | None = None, config: str | None = None):
    """The architecture to plan for: a named shape, a config.json, an alias, an HF directory or a .gguf file.
    Only the configuration is read; no weight is loaded."""
    from transformers import AutoConfig

    if sum(x is not None for x in (model, shape, config)) != 1:
        raise UserError("plan: give exactly one of --model, --shape, --config")
    if shape:
        from slimtune.models.shapes import shape_config

        return shape_config(shape)
    if config:
        path = Path(config)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"--config {config}: not a readable JSON file ({err})") from None
        if not isinstance(raw, dict) or "model_type" not in raw:
            raise UserError(f"--config {config}: no 'model_type' (a transformers config.json has one)")
        try:
            return AutoConfig.for_model(raw.pop("model_type"), **raw)
        except ValueError as err:
            raise UserError(f"--config {config}: {err}") from None
    return _config_of_model(model)


def _config_of_model(model: str):
    from transformers import AutoConfig

    from slimtune.models import loading as models

    if model in models.ALIASES:
        cached = models.cache_dir() / model
        if (cached / "config.json").is_file():
            return AutoConfig.from_pretrained(cached)
        gguf = models.alias_source(model)
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path)
    raise UserError(
        f"--model {model}: not an alias ({', '.join(models.ALIASES)}), an HF model directory or a .gguf file"
    )


def method_runs(methods: str | None, overrides: list[str] | None) -> list[tuple[str, dict]]:
    """(name, settings) per method to plan: ``methods`` comma-separated (default: every trainer method),
    ``overrides`` as `bench` takes them (``lora.r=64``); all validated before any trace."""
    from slimtune.methods import METHODS, TRAINER, require_trainer
    from slimtune.training.config import parse_overrides

    names = [m.strip() for m in (methods or "").split(",") if m.strip()]
    names = names or [n for n, spec in METHODS.items() if spec.kind == TRAINER]
    for name in names:
        require_trainer(name, "plan")
    extra = parse_overrides(overrides) if overrides else {}
    for name in extra:
        if name not in names:
            raise UserError(
                f"plan override '{name}.…': '{name}' is not one of the planned methods ({', '.join(names)})"
            )
    runs = [(n, extra.get(n, {})) for n in names]
    for n, settings in runs:
        METHODS[n].config_cls(**settings)  # a bad setting fails here, before any trace
    return runs


def _row(config, name: str, settings: dict, batch: int, seq: int, opts: dict, budget, gpu) -> PlanRow:
    from slimtune.methods import METHODS, make_config

    # the method was checked once, by method_runs; each of the many traces of a search reuses its spec
    trace = trace_step(config, make_config(name, **settings), batch, seq, spec=METHODS[name], **opts)
    return row_from_trace(trace, batch, seq, budget, gpu)


def _largest(config, name, settings, row: PlanRow, opts, budget: int, gpu, axis: str) -> int:
    """The largest batch (``axis`` 'batch') or sequence length (a multiple of 64 from 128 on) that fits: each
    guess is traced and checked; the next comes from the line through the last two traces (activations and
    temporaries grow with tokens, the rest does not). Returns the largest checked size that fits (0: none)."""
    size = row.batch if axis == "batch" else row.seq_len
    points = [(size, row.total)]
    best = size if row.fits else 0
    varying = row.activations + row.temporaries
    if varying <= 0:
        return best
    guess = size * (budget - (row.total - varying)) / varying
    for _ in range(3):
        guess = int(guess) - (int(guess) % 64 if axis == "seq_len" and guess >= 128 else 0)
        if guess < 1 or any(guess == x for x, _ in points):
            break
        b, s = (guess, row.seq_len) if axis == "batch" else (row.batch, guess)
        total = _row(config, name, settings, b, s, opts, budget, gpu).total
        if total <= budget:
            best = max(best, guess)
        points.append((guess, total))
        (x0, f0), (x1, f1) = points[-2], points[-1]
        if f1 == f0:
            break
        guess = x1 + (budget - f1) * (x1 - x0) / (f1 - f0)
        if total <= budget and guess < x1 + 1:
            break
    return best


def plan(
    config,
    runs: list[tuple[str, dict]],
    batch: int = 4,
    seq_len: int = 512,
    dtype: str = "bf16",
    grad_accum: int = 1,
    grad_checkpointing: bool = False,
    gpu: str | None = None,
    fit: str = "batch",
    log=lambda msg: None,
    fsdp: int = 1,
    optimizer_in_backward: bool = False,
) -> list[PlanRow]:
    """One :class:`PlanRow` per (method, settings); with ``gpu``, whether it fits and (``fit`` 'batch' or
    'seq_len') the largest batch or sequence length that does. ``fsdp`` N > 1: per rank of an FSDP2 job of N
    processes (``batch`` rows per rank), traced through the trainer's sharding on a fake process group.
    ``optimizer_in_backward``: each parameter steps inside backward (``train.optimizer_in_backward``)."""
    if fit not in ("batch", "seq_len", "none"):
        raise UserError(f"--fit: '{fit}' is not one of batch, seq_len, none")
    if dtype not in DTYPES:
        raise UserError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    if batch < 1 or seq_len < 1 or grad_accum < 1:
        raise UserError("--batch, --seq-len and --grad-accum must be positive")
    if fsdp < 1:
        raise UserError(f"--fsdp: {fsdp} must be a positive number of processes")
    if optimizer_in_backward and (grad_accum > 1 or fsdp > 1):
        raise UserError(
            "--optimizer-in-backward: needs --grad-accum 1 and one process (each parameter steps as soon as one "
            "backward has formed its gradient)"
        )
    if fsdp > 1:
        from slimtune.engines.support import status

        for name, _ in runs:
            ok, why = status(name, "fsdp")
            if not ok:
                raise UserError(f"plan --fsdp: method '{name}' does not run under FSDP: {why}")
    budget, named = parse_budget(gpu) if gpu else (None, None)
    opts = {"dtype": DTYPES[dtype], "grad_accum": grad_accum, "grad_checkpointing": grad_checkpointing}
    if optimizer_in_backward:
        opts["optimizer_in_backward"] = True
    if fsdp > 1:
        opts["fsdp"] = fsdp
    rows = []
    for name, settings in runs:
        log(f"plan: tracing {name} at {batch} x {seq_len} ...")
        row = _row(config, name, settings, batch, seq_len, opts, budget, named)
        if budget is not None and fit == "batch":
            row.largest_batch = _largest(config, name, settings, row, opts, budget, named, "batch")
        elif budget is not None and fit == "seq_len":
            row.largest_seq_len = _largest(config, name, settings, row, opts, budget, named, "seq_len")
        rows.append(row)
    return rows


__all__ = ["GPU", "PlanRow", "method_runs", "model_config", "plan"]

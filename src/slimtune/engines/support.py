"""Which distributed engine each trainer method runs under: one table, consulted before the model loads.

An engine is how the job was launched: ``single`` (one process), ``ddp`` (``torchrun`` or ``accelerate launch
--multi_gpu``: every rank holds the model, gradients are averaged), ``fsdp`` (FSDP2: ``train.engine: fsdp``, or ``accelerate
launch --use_fsdp``), ``deepspeed`` (ZeRO-2/3: ``train.engine: deepspeed``, or ``accelerate launch --use_deepspeed``). The status of a pair is ``yes`` (a 2-process
equivalence test passes on this CPU: tests/engines/test_distributed.py) or ``no`` with the reason and what to use instead.
docs/distributed.md shows :func:`render`'s table; a test fails when the two disagree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from slimtune.core.errors import UserError
from slimtune.engines.base import Engine

ENGINES = ("single", "ddp", "fsdp", "deepspeed")


def status(method: str, engine: str) -> tuple[bool, str]:
    """(supported, why) for ``method`` under ``engine``: every trainer method runs in one process and under DDP;
    under FSDP2 and DeepSpeed unless its registry entry declares why not (``MethodSpec.sharding``). Each
    supported pair has a 2-process equivalence test (tests/engines/test_distributed.py reads the same registry)."""
    from slimtune.methods import get_spec

    if engine in ("single", "ddp"):
        return True, "2-process equivalence test" if engine == "ddp" else ""
    refusal = get_spec(method).sharding
    if refusal is not None:
        return False, refusal
    if engine == "fsdp":
        return True, "2-process equivalence test"
    return True, "2-process equivalence tests, ZeRO-2 and ZeRO-3"


OPTIONS = (
    "mixed_precision: bf16",
    "mixed_precision: fp16",
    "grad_checkpointing",
    "4-bit base",
    "CPU offload",
)
_UNTESTED = "untested: no GPU here to run it (CPUs compute fp32)"
_NO_OFFLOAD = (
    "not built: slimtune has no CPU-offload setting (MEFT keeps its adapter in host memory by design)"
)


def option_status(engine: str, option: str) -> tuple[str, str]:
    """(yes | no | untested, why) for a training option under ``engine``; ``no`` is refused before loading."""
    if option == "CPU offload":
        return "no", _NO_OFFLOAD
    if option == "mixed_precision: fp16" and engine == "fsdp":
        return "no", "FSDP2 shards the gradients the fp16 loss scaler would unscale: use bf16"
    if option.startswith("mixed_precision"):
        return "untested", _UNTESTED
    if engine == "single":
        return "yes", ""
    if option == "4-bit base":
        return "yes", "QLoRA and QST in the 2-process equivalence tests (the 4-bit codes are replicated)"
    return "yes", "LoRA in a 2-process equivalence test (with gradient clipping)"


def launched_engine(env: Mapping[str, str] | None = None, configured: str = "auto") -> str:
    """The engine this process runs under: ``configured`` (``train.engine``) when it names one, else what the
    launchers' environment variables say."""
    env = os.environ if env is None else env
    if configured in ("ddp", "fsdp", "deepspeed"):
        return configured if int(env.get("WORLD_SIZE", "1")) > 1 else "single"
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp" if int(env.get("WORLD_SIZE", "1")) > 1 else "single"


def require_supported(
    method: str, env: Mapping[str, str] | None = None, configured: str = "auto", mixed_precision: str = "no"
) -> str:
    """The engine (:func:`launched_engine`), or one :class:`UserError` naming the method × engine pair (or the
    engine × option pair) and the nearest supported alternative, before any model is loaded."""
    engine = launched_engine(env, configured)
    option = f"mixed_precision: {mixed_precision}"
    if option in OPTIONS and option_status(engine, option)[0] == "no":
        raise UserError(
            f"train.mixed_precision: {mixed_precision} under {engine}: {option_status(engine, option)[1]}"
        )
    ok, why = status(method, engine)
    if ok and engine == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(
                "train.engine: deepspeed needs the deepspeed package (`make setup-extras`, or "
                "`DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed`)"
            )
    if not ok:
        raise UserError(
            f"method '{method}' under {engine}: {why}; launch it with DDP instead "
            f"(`torchrun --nproc_per_node N -m slimtune.cli train CONFIG` on CPUs, "
            f"`accelerate launch --multi_gpu -m slimtune.cli train CONFIG` on GPUs)"
        )
    return engine


def zero_stage(configured: int, env: Mapping[str, str] | None = None) -> int:
    """The ZeRO stage of a DeepSpeed job: ``accelerate launch --zero_stage N`` when it says one, else
    ``train.zero_stage``."""
    env = os.environ if env is None else env
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(configured))
    if stage not in ("2", "3"):
        raise UserError(f"ZeRO stage {stage} (ACCELERATE_DEEPSPEED_ZERO_STAGE): slimtune runs stages 2 and 3")
    return int(stage)


def make_engine(acc, method: str, cfg, resume: bool = False, engine: str | None = None) -> Engine:
    """The :class:`Engine` this job runs under; ``cfg``: the run's :class:`~slimtune.training.config.TrainConfig`.
    ``engine``: what :func:`require_supported` returned where the job checked the pair before loading the model;
    without it the check runs here. One process is the single engine whatever was configured."""
    if engine is None:
        engine = require_supported(method, configured=cfg.engine, mixed_precision=acc.mixed_precision)
    if acc.num_processes == 1 or engine in ("single", "ddp"):
        from slimtune.engines.ddp import DDPEngine

        return DDPEngine(acc, cfg.grad_accum, cfg.max_grad_norm)
    if engine == "fsdp":
        from slimtune.engines.fsdp import FSDPEngine

        return FSDPEngine(acc, cfg.grad_accum, cfg.max_grad_norm)
    if resume:
        raise UserError(
            "--resume under deepspeed: not built (DeepSpeed builds AdamW's state from the tensors it "
            "partitions); the checkpoint is the single-process format: resume it under train.engine=ddp or "
            "fsdp, or in one process"
        )
    from slimtune.engines.deepspeed import DeepSpeedEngine

    stage = zero_stage(cfg.zero_stage)
    return DeepSpeedEngine(acc, cfg.grad_accum, cfg.max_grad_norm, stage, cfg.batch_size)


def render() -> str:
    """The method × engine table of docs/distributed.md."""
    notes: list[str] = []
    rows = ["| method | " + " | ".join(ENGINES) + " |", "|---" * (len(ENGINES) + 1) + "|"]
    from slimtune.methods import trainer_methods

    for m in trainer_methods():
        cells = []
        for e in ENGINES:
            ok, why = status(m, e)
            if ok:
                cells.append("yes")
                continue
            if why not in notes:
                notes.append(why)
            cells.append(f"no ({notes.index(why) + 1})")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    rows += ["", "| option | " + " | ".join(ENGINES) + " |", "|---" * (len(ENGINES) + 1) + "|"]
    for o in OPTIONS:
        cells = []
        for e in ENGINES:
            state, why = option_status(e, o)
            if why and why not in notes:
                notes.append(why)
            cells.append(f"{state} ({notes.index(why) + 1})" if why else state)
        rows.append(f"| {o} | " + " | ".join(cells) + " |")
    rows.append("")
    rows += [f"({i}) {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(rows) + "\n"

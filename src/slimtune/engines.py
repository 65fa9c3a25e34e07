"""Which distributed engine each trainer method runs under: one table, consulted before the model loads.

An engine is how the job was launched: ``single`` (one process), ``ddp`` (``torchrun`` or ``accelerate launch
--multi_gpu``: every rank holds the model, gradients are averaged), ``fsdp`` (``accelerate launch --use_fsdp`` or an
FSDP config), ``deepspeed`` (``accelerate launch --use_deepspeed``). The status of a pair is ``yes`` (a 2-process
equivalence test passes on this CPU: tests/test_distributed.py) or ``no`` with the reason and what to use instead.
docs/distributed.md shows :func:`render`'s table; a test fails when the two disagree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from slimtune.errors import UserError

ENGINES = ("single", "ddp", "fsdp", "deepspeed")
TRAINER_METHODS = ("full", "lora", "qlora", "qst", "sat", "pst", "meft")

_NOT_YET = (
    "not built yet: slimtune's chunked loss applies the LM head outside the forward, which a resharded head "
    "breaks, and its checkpoints need the sharded state gathered; accelerate selects FSDP only on GPU device "
    "types, so nothing here could test it"
)
_DEEPSPEED = (
    "not built yet: the trainer does not drive DeepSpeed's engine (DeepSpeed 0.19.8 itself installs from PyPI and "
    "runs ZeRO-2 with 2 CPU processes over gloo here, so it can be tested)"
)
_MEFT_SHARD = (
    "MEFT's adapter lives in host memory outside the model: there is nothing for FSDP or ZeRO to shard"
)


def status(method: str, engine: str) -> tuple[bool, str]:
    """(supported, why) for ``method`` under ``engine``."""
    if engine in ("single", "ddp"):
        return True, "2-process equivalence test" if engine == "ddp" else ""
    if method == "meft":
        return False, _MEFT_SHARD
    return False, _NOT_YET if engine == "fsdp" else _DEEPSPEED


def launched_engine(env: Mapping[str, str] | None = None) -> str:
    """The engine this process was launched under, from the launchers' environment variables."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp" if int(env.get("WORLD_SIZE", "1")) > 1 else "single"


def require_supported(method: str, env: Mapping[str, str] | None = None) -> None:
    """One :class:`UserError` naming the method × engine pair and the nearest supported engine, before any
    model is loaded."""
    engine = launched_engine(env)
    ok, why = status(method, engine)
    if not ok:
        raise UserError(
            f"method '{method}' under {engine}: {why}; launch it with DDP instead "
            f"(`torchrun --nproc_per_node N -m slimtune.cli train CONFIG` on CPUs, "
            f"`accelerate launch --multi_gpu -m slimtune.cli train CONFIG` on GPUs)"
        )


def world_size(group=None) -> int:
    """Processes in ``group`` (the default group) of an initialised torch.distributed job; 1 otherwise."""
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def render() -> str:
    """The method × engine table of docs/distributed.md."""
    notes: list[str] = []
    rows = ["| method | " + " | ".join(ENGINES) + " |", "|---" * (len(ENGINES) + 1) + "|"]
    for m in TRAINER_METHODS:
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
    rows.append("")
    rows += [f"({i}) {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(rows) + "\n"

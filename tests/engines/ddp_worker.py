"""One side of the multi-process equivalence tests (tests/engines/test_distributed.py), run as
``torchrun --nproc_per_node N tests/engines/ddp_worker.py METHOD[:key=value,...] STEPS OUT_DIR [ENGINE [SAVE_AT]]``: N processes train a
tiny Llama with the real Trainer under ENGINE (ddp or fsdp; default ddp) on one global batch of 4 equal-length rows
(4 / N per rank); rank 0 writes the per-step losses the trainer reports and the final method state (gathered whole
under FSDP). SAVE_AT: save a checkpoint into OUT_DIR/run after that many steps, then build a fresh trainer that
resumes from it for the remaining steps (the state must survive the round trip; SAVE_AT = STEPS: only save); -1: resume the checkpoint
OUT_DIR/run already holds (written by another run) and train to STEPS. SLIMTUNE_TEST_TRAIN: more train settings
as JSON (gradient checkpointing, clipping)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from slimtune.capabilities.probes import SETTINGS, adapt, batch, trainer_for
from slimtune.core.processes import end_job


def _trainer(method: str, steps: int, engine: str, run_dir: Path, resume: bool = False):
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    name, _, extra = method.partition(":")  # METHOD[:key=value,...]
    adapted = adapt(name, "llama", **dict(kv.split("=", 1) for kv in extra.split(",") if kv))
    data = batch(b=4)
    trainer = trainer_for(
        adapted,
        steps,
        SETTINGS[name][1],
        data,
        run_dir=run_dir,
        resume=resume,
        batch_size=4 // world,
        engine=engine,
        **json.loads(os.environ.get("SLIMTUNE_TEST_TRAIN", "{}")),
    )
    trainer.model.train()
    return adapted, trainer


def main(method: str, steps: int, out: Path, engine: str = "ddp", save_at: int = 0) -> None:
    torch.set_num_threads(1)
    run_dir = out / "run"
    if save_at < 0:  # resume what OUT_DIR/run holds (written by another run) to the end
        adapted, trainer = _trainer(method, steps, engine, run_dir, resume=True)
        trainer.restore()
        losses = [trainer.train_step()[0] for _ in range(steps - trainer.step)]
        save_at = 0
    else:
        adapted, trainer = _trainer(method, steps, engine, run_dir)
        losses = [trainer.train_step()[0] for _ in range(save_at or steps)]
    if save_at:
        trainer.save_checkpoint()
    if 0 < save_at < steps:  # (save_at == steps: only the checkpoint, for another run to resume)
        adapted, trainer = _trainer(method, steps, engine, run_dir, resume=True)
        trainer.restore()
        assert trainer.step == save_at, trainer.step
        losses += [trainer.train_step()[0] for _ in range(steps - save_at)]
    with trainer.whole_model():
        state = {k: v.detach().float().contiguous().cpu() for k, v in adapted.state_dict().items()}
    if trainer.acc.is_main_process:
        save_file(state, str(out / "state.safetensors"))
        rec = {"losses": losses, "world": trainer.acc.num_processes, "sharded": trainer.engine.name == "fsdp"}
        (out / "losses.json").write_text(json.dumps(rec))
    end_job(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:5], *map(int, sys.argv[5:6]))

"""One side of the DDP equivalence tests (tests/test_distributed.py), run as
``torchrun --nproc_per_node N tests/ddp_worker.py METHOD STEPS OUT_DIR``: N processes train a tiny Llama with the
real Trainer on one global batch of 4 equal-length rows (4 / N per rank); rank 0 writes the per-step losses the
trainer reports and the final method state."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from slimtune.capabilities import SETTINGS, adapt, batch, trainer_for


def main(method: str, steps: int, out: Path) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    adapted = adapt(method, "llama")
    trainer = trainer_for(adapted, steps, SETTINGS[method][1], batch(b=4), batch_size=4 // world)
    trainer.model.train()
    losses = [trainer.train_step()[0] for _ in range(steps)]
    if trainer.acc.is_main_process:
        state = {k: v.detach().float().contiguous().cpu() for k, v in adapted.state_dict().items()}
        save_file(state, str(out / "state.safetensors"))
        (out / "losses.json").write_text(json.dumps({"losses": losses, "world": world}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))

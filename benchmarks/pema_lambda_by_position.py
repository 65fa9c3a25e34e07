"""Where does PEMA help? Gold-token accuracy and negative log-likelihood of the owner's LM, of PEMA and of their
mixture at several λ, by target position, on a teacher-forced dev memory.

    .venv/bin/slimtune pema build-memory CONFIG train.output_dir=RUN method.memory_mode=teacher_forced \\
        method.allow_target_disclosure=true
    .venv/bin/slimtune pema train CONFIG train.output_dir=RUN method.memory_mode=teacher_forced \\
        method.allow_target_disclosure=true
    .venv/bin/python benchmarks/pema_lambda_by_position.py CONFIG RUN

Gradual Unrolling assumes PEMA is most useful at the start of a target and the LM afterwards, i.e. that the
λ minimising the gold NLL decreases with the position. This prints that λ per position bucket. Rows of a
teacher-forced memory are (state after prompt + y_<t, y_t), one per target token plus one stop row, in pair order,
so positions are recovered from the dev pairs' target lengths. Only the head, the memory and the adapter are read.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from slimtune.methods.pema.layer import ExternalMemory, PEMAAdapter, mix_log_probs
from slimtune.models import loading as models
from slimtune.recipes.pema import dev_split, encode_pair, load_head, read_pairs
from slimtune.training import config as C

BUCKETS = [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 10**9)]
LAMBDAS = [0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0]


@torch.no_grad()
def main(config: str, run: str) -> None:
    cfg = C.load_config(config, [f"train.output_dir={run}"])
    pcfg, root = cfg.method, Path(run)
    head = load_head(root)
    adapter = PEMAAdapter(head.weight.shape[1], pcfg)
    adapter.load_state_dict(load_file(str(root / "adapter" / "pema.safetensors")))
    adapter.eval()
    mem = ExternalMemory.load(root / "memory" / "dev.safetensors")
    tok = AutoTokenizer.from_pretrained(models._cached_alias(cfg.model.name))
    dev = dev_split(read_pairs(cfg)[0], pcfg)["dev"]
    pos = torch.tensor([t for r in dev for t in range(len(encode_pair(tok, r)[1]) + 1)])
    if pos.numel() != mem.keys.shape[0]:
        sys.exit(
            f"{root / 'memory' / 'dev.safetensors'}: {mem.keys.shape[0]} rows, not a teacher-forced memory"
        )
    lp_lm = torch.log_softmax(head.logits(head.norm(mem.keys)), -1)
    lp_pema = torch.log_softmax(head.logits(adapter.predict_hidden(mem.keys)), -1)
    y = mem.values
    print(
        "positions  rows  acc LM  acc PEMA  gold NLL at λ = "
        + "  ".join(f"{v:g}" for v in LAMBDAS)
        + "  best λ"
    )
    for a, b in BUCKETS:
        m = (pos >= a) & (pos < b)
        if not bool(m.any()):
            continue
        n = int(m.sum())
        acc = [float((lp[m].argmax(-1) == y[m]).float().mean()) for lp in (lp_lm, lp_pema)]
        nll = [
            float(-mix_log_probs(lp_lm[m], lp_pema[m], torch.full((n,), lam)).gather(1, y[m][:, None]).mean())
            for lam in LAMBDAS
        ]
        best = LAMBDAS[min(range(len(LAMBDAS)), key=nll.__getitem__)]
        span = f"[{a},{b})" if b < 10**9 else f"[{a},…)"
        print(
            f"{span:9} {n:5}  {acc[0]:6.2f}  {acc[1]:8.2f}  "
            + "  ".join(f"{v:5.2f}" for v in nll)
            + f"  {best:g}"
        )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])

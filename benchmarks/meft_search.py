"""Host-side selection cost of MEFT: brute force (r dot products per token) vs Key-Experts (N + n_p·r/N).

    .venv/bin/python benchmarks/meft_search.py            # SmolLM2 width, 1024 tokens, r = 4096, K = 64
Prints median wall times over interleaved repeats and the ratio; single process, the machine's threads.
"""

from __future__ import annotations

import statistics
import time

import torch

from slimtune.methods.meft.layer import select_topk


def main(
    tokens: int = 1024, d: int = 576, r: int = 4096, k: int = 64, experts: int = 64, n_probe: int = 8
) -> None:
    g = torch.Generator().manual_seed(0)
    x, keys = torch.randn(tokens, d, generator=g), torch.randn(r, d, generator=g) * 0.04
    router = keys.view(experts, r // experts, d).mean(1) * 50
    brute, ke = [], []
    for _ in range(7):
        t = time.perf_counter()
        select_topk(x, keys, k)
        brute.append(time.perf_counter() - t)
        t = time.perf_counter()
        sel = select_topk(x, keys, k, x @ router.t(), n_probe)
        ke.append(time.perf_counter() - t)
    b, e = statistics.median(brute), statistics.median(ke)
    print(f"tokens {tokens}, d {d}, r {r}, K {k}: brute force {b * 1e3:.1f} ms ({r} dot products/token); "
          f"Key-Experts N={experts}, n_p={n_probe}: {e * 1e3:.1f} ms ({sel.dots_per_token} dot products/token, "
          f"router included); ratio {b / e:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()

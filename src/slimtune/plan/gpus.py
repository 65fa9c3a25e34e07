"""Named accelerators (memory, dense bf16 tensor throughput, memory bandwidth) and memory sizes as users write them.

Figures are the vendors' data-sheet numbers: dense (not 2:4-sparse) bf16/fp16 tensor-core FLOP/s with fp32
accumulation, and DRAM bandwidth. Memory is what the card has, not what a process can use: the CUDA context and
the caching allocator take their share (``CUDA_OVERHEAD``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slimtune.core.errors import UserError

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int
    tflops: float
    """Dense bf16 tensor-core TFLOP/s (data sheet)."""
    bandwidth_gbs: float
    """DRAM bandwidth, GB/s (data sheet)."""


GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("t4", 16 * GiB, 65, 320),
        GPU("l4", 24 * GiB, 121, 300),
        GPU("a10", 24 * GiB, 125, 600),
        GPU("a5000", 24 * GiB, 111, 768),
        GPU("3090", 24 * GiB, 71, 936),
        GPU("4090", 24 * GiB, 165, 1008),
        GPU("a6000", 48 * GiB, 155, 768),
        GPU("l40s", 48 * GiB, 362, 864),
        GPU("a100-40", 40 * GiB, 312, 1555),
        GPU("a100-80", 80 * GiB, 312, 2039),
        GPU("h100", 80 * GiB, 989, 3350),
        GPU("h200", 141 * 10**9, 989, 4800),
    )
}

CUDA_CONTEXT = 600 * 2**20
"""CUDA context and the kernels PyTorch loads: 300-800 MiB depending on the GPU and CUDA version (an idle PyTorch
process in nvidia-smi); 600 MiB is planned."""
ALLOCATOR_SHARE = 0.05
"""PyTorch's caching allocator rounds blocks (512 B small, 2 MiB large segments) and keeps freed blocks cached:
planned as 5% of the tensor peak (fragmentation grows with varying shapes; see PyTorch's CUDA semantics notes)."""


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gib|gb|mib|mb|tib|tb|g|m)\s*$", re.IGNORECASE)
_UNITS = {
    "gib": GiB,
    "g": GiB,
    "gb": 10**9,
    "mib": 2**20,
    "m": 2**20,
    "mb": 10**6,
    "tib": 2**40,
    "tb": 10**12,
}


def parse_budget(text: str) -> tuple[int, GPU | None]:
    """``24GiB`` / ``80GB`` / ``a100-80`` -> (bytes, the named GPU or None)."""
    key = text.strip().lower()
    if key in GPUS:
        return GPUS[key].memory, GPUS[key]
    m = _SIZE.match(key)
    if not m:
        raise UserError(f"--gpu: '{text}' is neither a size (e.g. 24GiB, 80GB) nor a GPU ({', '.join(GPUS)})")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()]), None

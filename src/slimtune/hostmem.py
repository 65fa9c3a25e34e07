"""Host-memory settings a training process needs before PyTorch allocates anything.

PyTorch's CPU allocator asks the kernel for transparent huge pages for every tensor of 2 MiB and more when the
environment has ``THP_MEM_ALLOC_ENABLE=1`` (read once, at its first allocation, i.e. while ``import torch`` runs).
On Linux with transparent huge pages in ``madvise`` or ``always`` mode this lowered the peak RSS of a LoRA step on
SmolLM2-135M (4 x 256, 2 threads) from 4.02 to 3.41 GB at the same step time (docs/memory.md has the figures and the
settings that were measured and rejected: glibc's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` lower the
peak further but make each step 35-100% slower).

:func:`enable_huge_pages` runs first when ``slimtune`` is imported. It sets nothing when the user set
``THP_MEM_ALLOC_ENABLE`` (either way), when ``SLIMTUNE_HUGE_PAGES=0``, when PyTorch is already imported (too late:
the setting would not take effect), off Linux, or when the kernel has huge pages off.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import MutableMapping
from pathlib import Path

THP_ENV = "THP_MEM_ALLOC_ENABLE"
OPT_OUT_ENV = "SLIMTUNE_HUGE_PAGES"
THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage/enabled")

applied = False
"""Whether this process set ``THP_MEM_ALLOC_ENABLE`` itself (child processes inherit it)."""


def kernel_thp_mode(path: Path = THP_SYSFS) -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``), None where unknown."""
    try:
        found = re.search(r"\[(\w+)\]", path.read_text())
    except OSError:
        return None
    return found.group(1) if found else None


def enable_huge_pages(
    environ: MutableMapping[str, str] | None = None,
    platform: str | None = None,
    torch_imported: bool | None = None,
    thp_mode: str | None = None,
) -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` for PyTorch's CPU allocator where it can still take effect and the user did not
    decide; True when this call set it. The arguments default to this process and machine (tests pass others)."""
    global applied
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    torch_imported = "torch" in sys.modules if torch_imported is None else torch_imported
    if THP_ENV in environ or environ.get(OPT_OUT_ENV, "1") == "0" or torch_imported:
        return False
    if not platform.startswith("linux"):
        return False
    if (kernel_thp_mode() if thp_mode is None else thp_mode) not in ("madvise", "always"):
        return False
    environ[THP_ENV] = "1"
    if environ is os.environ:
        applied = True
    return True


def huge_pages_on() -> bool:
    """Whether PyTorch's CPU allocator in this process uses huge pages (the setting it read at import)."""
    return os.environ.get(THP_ENV, "0") == "1"


def as_users_run(environ: MutableMapping[str, str]) -> dict[str, str]:
    """``environ`` for a process that must run as a user's would without slimtune (a peer in ``slimtune bench``):
    without the setting slimtune made, and told not to make it again."""
    env = dict(environ)
    if applied:
        env.pop(THP_ENV, None)
    env[OPT_OUT_ENV] = "0"
    return env

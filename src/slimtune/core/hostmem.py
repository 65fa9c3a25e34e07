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

The C heap: glibc's malloc keeps the blocks a step frees, and the glibc settings that hand them back cost 35-100%
per step. TCMalloc reuses and returns them at no cost: the LoRA step above peaked at 2.51 GB with TCMalloc and 2.84
with glibc and was 6% faster; with ``memory: low`` 1.37 against 1.54 GB (one bench invocation each,
docs/memory.md; jemalloc: the same memory, slower here). A malloc can only be chosen when a program starts (``LD_PRELOAD``), so the
``slimtune`` command, before it imports anything heavy, starts itself again (``execve``: same process id, same
arguments, torchrun / accelerate notice nothing) with the library preloaded, where one is installed
(:func:`use_allocator`). ``SLIMTUNE_ALLOCATOR``: ``auto`` (default: TCMalloc, else jemalloc, else the system's),
``tcmalloc``, ``jemalloc`` (an error when not found), ``system`` (leave malloc alone). The library is found the way
PyTorch's CPU launcher (``torch.backends.xeon.run_cpu``) finds it, plus the distribution's multiarch directory where
Debian/Ubuntu packages put it (``apt install libtcmalloc-minimal4``); written here because that launcher looks for
the development symlink only and also rebinds threads and OpenMP, which slimtune leaves to the user.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from collections.abc import Mapping, MutableMapping
from pathlib import Path

THP_ENV = "THP_MEM_ALLOC_ENABLE"
OPT_OUT_ENV = "SLIMTUNE_HUGE_PAGES"
THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage/enabled")

applied = False
"""Whether this process set ``THP_MEM_ALLOC_ENABLE`` itself (child processes inherit it)."""

ALLOCATOR_ENV = "SLIMTUNE_ALLOCATOR"
PRELOADED_ENV = "SLIMTUNE_PRELOADED"
"""Set with ``LD_PRELOAD`` by :func:`allocator_env`: the library slimtune added (so a peer can run without it)."""
ALLOCATORS = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
}
CHOICES = ("auto", *ALLOCATORS, "system")
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
"""TCMalloc reports every allocation over 1 GiB on stderr by default (a 7B model's Adam state is many of them)."""


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
    without the settings slimtune made (huge pages, the preloaded malloc), and told not to make them again."""
    env = dict(environ)
    if applied:
        env.pop(THP_ENV, None)
    env[OPT_OUT_ENV] = "0"
    added = env.pop(PRELOADED_ENV, None)
    if added:
        kept = [p for p in env.get("LD_PRELOAD", "").split(":") if p and p != added]
        env["LD_PRELOAD"] = ":".join(kept)
        if not kept:
            env.pop("LD_PRELOAD")
        for key, value in QUIET.items():
            if env.get(key) == value:
                env.pop(key)
    env[ALLOCATOR_ENV] = "system"
    return env


def library_dirs(environ: Mapping[str, str]) -> list[Path]:
    """Where a preloadable malloc is looked for, in order: the active conda / virtual environment, the user's and
    the system's library directories, the multiarch directory (``/usr/lib/x86_64-linux-gnu``)."""
    dirs = [Path(environ[k]) / "lib" for k in ("CONDA_PREFIX", "VIRTUAL_ENV") if environ.get(k)]
    dirs += [Path.home() / ".local" / "lib", Path("/usr/local/lib"), Path("/usr/local/lib64")]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    dirs += [Path("/usr/lib") / multiarch] if multiarch else []
    return dirs + [Path("/usr/lib"), Path("/usr/lib64")]


def find_allocator(name: str, dirs: list[Path]) -> Path | None:
    """The first of ``name``'s libraries (:data:`ALLOCATORS`) found in ``dirs``."""
    for d in dirs:
        for lib in ALLOCATORS[name]:
            if (d / lib).is_file():
                return d / lib
    return None


def allocator_env(
    environ: Mapping[str, str] | None = None, platform: str | None = None, dirs: list[Path] | None = None
) -> dict[str, str] | None:
    """The environment a slimtune process should start with to run on TCMalloc / jemalloc (``LD_PRELOAD`` and
    :data:`PRELOADED_ENV` set), or None when nothing is to change: ``SLIMTUNE_ALLOCATOR=system``, off Linux, a malloc
    already preloaded (the user's, or this one after the restart), or none installed under ``auto``. An explicit
    choice that is not installed raises :class:`~slimtune.core.errors.UserError`."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    choice = environ.get(ALLOCATOR_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        from slimtune.core.errors import UserError

        raise UserError(f"{ALLOCATOR_ENV}={choice!r}: choose one of {', '.join(CHOICES)}")
    preload = environ.get("LD_PRELOAD", "")
    if choice == "system" or not platform.startswith("linux") or re.search(r"(tc|je|mi)malloc", preload):
        return None
    dirs = library_dirs(environ) if dirs is None else dirs
    for name in ALLOCATORS if choice == "auto" else (choice,):
        lib = find_allocator(name, dirs)
        if lib is not None:
            env = {**QUIET, **environ}
            env["LD_PRELOAD"] = ":".join(p for p in (str(lib), preload) if p)
            env[PRELOADED_ENV] = str(lib)
            return env
    if choice == "auto":
        return None
    from slimtune.core.errors import UserError

    raise UserError(
        f"{ALLOCATOR_ENV}={choice}: none of {', '.join(ALLOCATORS[choice])} in {', '.join(map(str, dirs))} "
        f"(Debian/Ubuntu: apt install {'libtcmalloc-minimal4' if choice == 'tcmalloc' else 'libjemalloc2'}; "
        f"{ALLOCATOR_ENV}=system uses the system's malloc)"
    )


def use_allocator() -> None:
    """Start this program again on the preloaded malloc when :func:`allocator_env` says so (``execve`` keeps the
    process id, open files and arguments; nothing has run yet). Called by the ``slimtune`` command only."""
    env = allocator_env()
    if env is None:
        return
    if applied:  # slimtune's own huge-page setting: the restarted process makes (and owns) it again
        env.pop(THP_ENV, None)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def allocator_in_use() -> str:
    """The malloc this process runs on: ``tcmalloc``, ``jemalloc`` or ``system`` (read from its loaded libraries)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in ALLOCATORS:
        if f"lib{name}" in maps:
            return name
    return "system"


def release_free_memory() -> str:
    """Hand the C heap's free pages back to the system now; returns how (``tcmalloc``, ``jemalloc``,
    ``malloc_trim``) or ``none``. Called once the model is prepared: loading, dequantizing and quantizing free
    weight-sized buffers the heap would otherwise keep (RSS, and memory no other process can use). Measured on the
    tinyllama-1.1b shape, QLoRA, 1 x 64: the training steps' peak RSS 5.48 -> 2.05 GB under TCMalloc (the fp32
    weights freed after quantizing, 4.4 GB, stayed in its page heap). One call, no effect on step time."""
    import ctypes

    try:
        lib = ctypes.CDLL(None)
    except OSError:
        return "none"
    name = allocator_in_use()
    try:
        if name == "tcmalloc":
            lib.MallocExtension_ReleaseFreeMemory()
        elif name == "jemalloc":  # every arena (MALLCTL_ARENAS_ALL)
            lib.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
        else:
            lib.malloc_trim(ctypes.c_size_t(0))
            name = "malloc_trim"
    except AttributeError:  # a malloc without that call (not glibc: musl, macOS)
        return "none"
    return name


def report() -> dict[str, object]:
    """What this process's host memory runs on: its malloc and whether PyTorch's allocator uses huge pages."""
    return {"allocator": allocator_in_use(), "huge_pages": huge_pages_on()}

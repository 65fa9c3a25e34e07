"""Huge pages for PyTorch's CPU allocator: set before torch is imported, only where the user did not decide."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slimtune.core import hostmem
from tests.conftest import clean_env, expected_allocator

PROBE = """
import re, slimtune, torch
def huge_kb():
    return int(re.search(r"AnonHugePages:\\s+(\\d+) kB", open("/proc/self/smaps_rollup").read()).group(1))
before = huge_kb()
t = torch.ones(64 * 2**20 // 4)
print(slimtune._hostmem.huge_pages_on(), huge_kb() - before)
"""


def _probe(env_extra: dict[str, str]) -> tuple[str, int]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in (hostmem.THP_ENV, hostmem.OPT_OUT_ENV)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**env, **env_extra}, capture_output=True, text=True, check=True
    )
    on, kb = out.stdout.split()
    return on, int(kb)


@pytest.mark.parametrize(
    "environ, platform, torch_imported, mode, expected",
    [
        ({}, "linux", False, "madvise", "1"),
        ({}, "linux", False, "always", "1"),
        ({}, "linux", False, "never", None),
        ({}, "linux", False, "", None),  # mode unknown
        ({}, "darwin", False, "madvise", None),
        ({}, "linux", True, "madvise", None),  # too late: torch read its setting at import
        ({"THP_MEM_ALLOC_ENABLE": "0"}, "linux", False, "madvise", "0"),  # the user's choice stays
        ({"SLIMTUNE_HUGE_PAGES": "0"}, "linux", False, "madvise", None),
    ],
)
def test_the_setting_is_made_only_where_it_takes_effect_and_the_user_did_not_decide(
    environ, platform, torch_imported, mode, expected
):
    env = dict(environ)
    changed = hostmem.enable_huge_pages(env, platform, torch_imported, mode)
    assert env.get(hostmem.THP_ENV) == expected
    assert changed == (expected == "1")


def test_the_kernel_mode_is_read_from_its_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hostmem.kernel_thp_mode(f) == "madvise"
    assert hostmem.kernel_thp_mode(tmp_path / "missing") is None


@pytest.mark.skipif(
    hostmem.kernel_thp_mode() not in ("madvise", "always"), reason="the kernel has transparent huge pages off"
)
def test_importing_slimtune_first_gives_torch_tensors_huge_pages():
    on, kb = _probe({})
    assert on == "True" and kb >= 32 * 1024  # most of a 64 MiB tensor in 2 MiB pages
    if hostmem.kernel_thp_mode() == "madvise":  # (under "always" every mapping gets them anyway)
        for opt_out in ({hostmem.OPT_OUT_ENV: "0"}, {hostmem.THP_ENV: "0"}):
            assert _probe(opt_out) == ("False", 0)


def test_a_peer_runs_as_users_run_it(monkeypatch):
    monkeypatch.setattr(hostmem, "applied", True)
    env = hostmem.as_users_run({hostmem.THP_ENV: "1", "PATH": "/bin"})
    assert hostmem.THP_ENV not in env and env[hostmem.OPT_OUT_ENV] == "0" and env["PATH"] == "/bin"
    monkeypatch.setattr(hostmem, "applied", False)  # the user set it: the peer gets it too
    assert hostmem.as_users_run({hostmem.THP_ENV: "1"})[hostmem.THP_ENV] == "1"


def _libs(tmp_path, *names):
    for name in names:
        (tmp_path / name).write_bytes(b"")
    return [tmp_path]


@pytest.mark.parametrize(
    "environ, installed, preload",
    [
        (
            {},
            ("libjemalloc.so.2", "libtcmalloc_minimal.so.4"),
            "{d}/libtcmalloc_minimal.so.4",
        ),  # TCMalloc first
        ({}, ("libjemalloc.so.2",), "{d}/libjemalloc.so.2"),
        ({"LD_PRELOAD": "/x/libfoo.so"}, ("libtcmalloc.so.4",), "{d}/libtcmalloc.so.4:/x/libfoo.so"),  # kept
        (
            {"SLIMTUNE_ALLOCATOR": "jemalloc"},
            ("libjemalloc.so.2", "libtcmalloc.so.4"),
            "{d}/libjemalloc.so.2",
        ),
        ({}, (), None),  # none installed: the system's malloc, silently
        ({"SLIMTUNE_ALLOCATOR": "system"}, ("libtcmalloc.so.4",), None),
        ({"LD_PRELOAD": "/opt/libjemalloc.so"}, ("libtcmalloc.so.4",), None),  # the user's malloc stays
        ({"LD_PRELOAD": "{d}/libtcmalloc.so.4"}, ("libtcmalloc.so.4",), None),  # after the restart: no loop
    ],
)
def test_the_malloc_is_preloaded_only_where_installed_and_the_user_did_not_decide(
    tmp_path, environ, installed, preload
):
    environ = {k: v.format(d=tmp_path) for k, v in environ.items()}
    env = hostmem.allocator_env(environ, "linux", _libs(tmp_path, *installed))
    if preload is None:
        assert env is None
        return
    assert env["LD_PRELOAD"] == preload.format(d=tmp_path)
    assert env[hostmem.PRELOADED_ENV] == env["LD_PRELOAD"].split(":")[0]
    assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == str(1 << 40)  # no stderr line per large tensor
    assert hostmem.allocator_env(environ, "darwin", [tmp_path]) is None


def test_an_unknown_or_missing_malloc_is_one_clear_error(tmp_path):
    from slimtune.core.errors import UserError

    with pytest.raises(UserError, match=r"SLIMTUNE_ALLOCATOR='tmalloc': choose one of auto, tcmalloc"):
        hostmem.allocator_env({"SLIMTUNE_ALLOCATOR": "tmalloc"}, "linux", [tmp_path])
    with pytest.raises(
        UserError, match=r"SLIMTUNE_ALLOCATOR=tcmalloc: none of .* apt install libtcmalloc-minimal4"
    ):
        hostmem.allocator_env({"SLIMTUNE_ALLOCATOR": "tcmalloc"}, "linux", [tmp_path])
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from slimtune.cli import main; sys.exit(main())", "list"],
        env={**clean_env(), "SLIMTUNE_ALLOCATOR": "tmalloc"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "slimtune: error: SLIMTUNE_ALLOCATOR='tmalloc': choose one of auto, tcmalloc, jemalloc, system"
    ]


def test_a_peer_runs_on_the_users_malloc(tmp_path):
    env = hostmem.allocator_env(
        {"LD_PRELOAD": "/x/libfoo.so", "PATH": "/bin"}, "linux", _libs(tmp_path, "libtcmalloc.so.4")
    )
    peer = hostmem.as_users_run(env)
    assert peer["LD_PRELOAD"] == "/x/libfoo.so" and peer["PATH"] == "/bin"
    assert hostmem.PRELOADED_ENV not in peer and "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" not in peer
    assert (
        peer[hostmem.ALLOCATOR_ENV] == "system" and hostmem.allocator_env(peer, "linux", [tmp_path]) is None
    )
    assert "LD_PRELOAD" not in hostmem.as_users_run(hostmem.allocator_env({}, "linux", [tmp_path]))


RESTART = """
import os, sys
from slimtune.core import hostmem
print(os.getpid(), hostmem.allocator_in_use(), flush=True)
hostmem.use_allocator()
print(os.getpid(), hostmem.allocator_in_use(), sys.argv[1:], hostmem.applied == hostmem.huge_pages_on())
"""


def test_the_command_restarts_itself_on_the_installed_malloc_in_the_same_process():
    """``use_allocator`` (the first thing the ``slimtune`` command does) replaces the process by itself with the
    library preloaded: same pid and arguments, the malloc now loaded, the huge-page setting still slimtune's own
    (so a bench peer runs without it); nothing installed → it just goes on."""
    proc = subprocess.Popen(
        [sys.executable, "-c", RESTART, "train", "x.yaml"],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = out.strip().splitlines()
    want = expected_allocator()
    if want == "system":
        assert lines == [f"{proc.pid} system", f"{proc.pid} system ['train', 'x.yaml'] True"]
    else:  # the program ran once on glibc, was replaced, ran again on the preloaded malloc and went on
        assert lines == [
            f"{proc.pid} system",
            f"{proc.pid} {want}",
            f"{proc.pid} {want} ['train', 'x.yaml'] True",
        ]
    assert "large alloc" not in err


RELEASE = """
import re, sys
from pathlib import Path
import torch
from slimtune.core import hostmem

def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

kept = [torch.ones(64 << 10) for _ in range(4096)]  # 4096 x 256 KiB, touched: blocks a heap keeps
del kept
before = rss()
how = hostmem.release_free_memory()
print(hostmem.allocator_in_use(), how, before - rss())
"""


@pytest.mark.parametrize("preloaded", [False, True])
def test_the_heaps_free_memory_goes_back_to_the_system(preloaded):
    """What a model's preparation freed (1 GiB here, in blocks both heaps keep: measured, glibc and TCMalloc alike
    held all of it) leaves the RSS once ``release_free_memory`` runs (``api.prepare`` calls it)."""
    env = clean_env()
    if preloaded:
        want = expected_allocator()
        if want == "system":
            pytest.skip("no TCMalloc or jemalloc installed")
        env = hostmem.allocator_env(env)
    proc = subprocess.run(
        [sys.executable, "-c", RELEASE], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    name, how, freed = proc.stdout.split()
    if preloaded:
        assert name == how == expected_allocator()
    else:
        assert (name, how) == ("system", "malloc_trim")
    assert int(freed) > 0.8 * (1 << 30), f"{how} gave back {int(freed) / 2**20:.0f} MiB of 1024"

"""Huge pages for PyTorch's CPU allocator: set before torch is imported, only where the user did not decide."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slimtune import hostmem

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

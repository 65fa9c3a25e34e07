"""A method registered at run time is in every list that reads the registry: the engine table and its refusals,
the capability probes, and the per-method test lists (tests/registry.py) — CONTRIBUTING's checklist, to the
letter: nothing outside the method's own folder and its registry entry learns its name."""

from __future__ import annotations

import dataclasses

import pytest

from slimtune.capabilities import probes
from slimtune.engines import support
from slimtune.methods import METHODS, make_config, sharded_methods, trainer_methods
from slimtune.methods.baselines import LoraMethodConfig, apply_lora
from tests import registry


@dataclasses.dataclass
class EchoConfig(LoraMethodConfig):
    """LoRA under another name: a new method, as a user's registry line would add it."""

    name = "echo"


def apply_echo(model, cfg: EchoConfig):
    return apply_lora(model, cfg)


@pytest.fixture
def echo(monkeypatch):
    spec = dataclasses.replace(METHODS["lora"], name="echo", config_cls=EchoConfig, apply=apply_echo)
    monkeypatch.setitem(METHODS, "echo", spec)
    return spec


@pytest.fixture
def host_only(monkeypatch):
    """A method that declares it cannot be sharded."""
    spec = dataclasses.replace(
        METHODS["lora"],
        name="hostonly",
        config_cls=EchoConfig,
        apply=apply_echo,
        sharding="its state is on the host",
    )
    monkeypatch.setitem(METHODS, "hostonly", spec)
    return spec


def test_a_new_method_is_in_every_list(echo):
    assert "echo" in trainer_methods() and "echo" in sharded_methods()
    assert "echo" in registry.trainers() and "echo" in registry.sharded()
    assert "echo" in probes.SETTINGS and probes.SETTINGS["echo"] == (echo.probe, echo.probe_lr)
    assert all(support.status("echo", e)[0] for e in support.ENGINES)
    assert "| echo | yes | yes | yes | yes |" in support.render()
    assert make_config("echo", r=4).name == "echo"


def test_a_new_method_runs_through_the_probes(echo):
    """The family contract runs on it through the real trainer (identity at init, loss falls, save/load, merge)."""
    assert probes.probe_family("echo", "llama").status == "yes"


def test_a_declared_refusal_reaches_the_engine_table(host_only):
    assert "hostonly" in registry.trainers() and "hostonly" not in registry.sharded()
    assert support.status("hostonly", "fsdp") == (False, "its state is on the host")
    assert support.status("hostonly", "ddp")[0]
    with pytest.raises(Exception, match="its state is on the host"):
        support.require_supported("hostonly", env={"WORLD_SIZE": "2"}, configured="fsdp")

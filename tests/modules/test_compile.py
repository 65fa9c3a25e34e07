"""``train.compile``: the decoder layers' training forward through torch.compile (slimtune/modules/compiling.py).

Whether each method's layers compile and train to the eager state is the capability probe's (``compile`` in
docs/capabilities.md); here: what runs compiled and what stays eager, checkpointing under it, deep copies, and the
refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from slimtune.capabilities import probes as caps
from slimtune.core.errors import UserError
from slimtune.modules import compiling


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_training_steps_run_compiled_and_evaluation_eagerly(fresh_dynamo):
    data = caps.batch()
    eager, compiled = caps.adapt("lora", "llama"), caps.adapt("lora", "llama")
    losses = caps.train(eager, 2, 5e-3, data)
    assert graphs() == 0
    compiled_losses = caps.train(compiled, 2, 5e-3, data, compile=True)
    # the trainer's forward builds no KV cache (each layer's update would recompile, up to Dynamo's limit of 8):
    # one graph for layer 0 (its input, from the frozen embeddings, needs no gradient) and one for all others
    assert graphs() == 2
    n = graphs()
    assert compiled_losses == pytest.approx(losses, abs=1e-5)
    # evaluation (no gradients) and generation with a KV cache: eager, nothing new compiled
    compiled.model.eval()
    with torch.no_grad():
        out = compiled.model(**data).loss
    ids = data["input_ids"][:1, :4]
    gen = compiled.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3)
    assert gen.shape[1] == 7 and graphs() == n
    eager.model.eval()
    with torch.no_grad():
        assert out == pytest.approx(eager.model(**data).loss.item(), abs=1e-5)


def test_one_graph_serves_every_layer(fresh_dynamo):
    """The layers share one compiled graph (parameters are its inputs), not one compilation per layer."""
    a = caps.adapt("full", "llama")
    n_layers = compiling.compile_layers(a.model, "full")
    assert n_layers >= 2
    a.model.train()
    a.model(**caps.batch(), use_cache=False).loss.backward()
    assert graphs() == 1


def test_checkpointing_under_compile_ends_where_eager_does(fresh_dynamo):
    data = caps.batch()
    eager, compiled = caps.adapt("full", "llama"), caps.adapt("full", "llama")
    caps.train(eager, 3, 1e-3, data)
    caps.train(compiled, 3, 1e-3, data, compile=True, memory="low")
    assert graphs() >= 1
    assert caps._same_state(caps._state(eager), caps._state(compiled), 1e-5)


def test_a_deep_copy_runs_its_own_layers():
    a = caps.adapt("full", "llama")
    compiling.compile_layers(a.model, "full")
    twin = copy.deepcopy(a.model)
    from slimtune.modules.arch import decoder_layers

    for layer, copied in zip(decoder_layers(a.model), decoder_layers(twin), strict=True):
        assert layer.forward.__self__ is layer and copied.forward.__self__ is copied


def test_a_method_that_does_not_trace_is_refused():
    data = caps.batch()
    with pytest.raises(UserError, match=r"train\.compile: method 'sat': .*data-dependent shape"):
        caps.train(caps.adapt("sat", "llama"), 1, 1e-3, data, compile=True)


def test_qlora_on_the_pure_torch_nf4_backend_is_refused():
    with pytest.raises(UserError, match="pure-torch NF4 backend .* backend: bitsandbytes compiles"):
        caps.train(caps.adapt("qlora", "llama", backend="torch"), 1, 5e-3, caps.batch(), compile=True)


def test_no_cpp_compiler_is_one_line(monkeypatch):
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match=r"train\.compile: Inductor needs a C\+\+ compiler on PATH"):
        caps.train(caps.adapt("lora", "llama"), 1, 5e-3, caps.batch(), compile=True)


def test_several_processes_are_refused(monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(UserError, match="train.compile: not built for a 2-process run"):
        caps.trainer_for(caps.adapt("lora", "llama"), 1, 5e-3, caps.batch(), compile=True)

"""PEMA (offsite tuning with an external memory): docs/methods/pema.md on a tiny Llama (hidden 64, 2 layers)."""

import math

import pytest
import torch

from slimtune.core.errors import ConfigError
from slimtune.methods import make_config
from slimtune.methods.pema.layer import ExternalMemory, PEMAAdapter, build_memory, gu_lambda, mix_log_probs
from slimtune.methods.pema.owner import Owner
from slimtune.models.loading import tiny_llama
from slimtune.recipes.pema import pema_generate, train_pema

STOP = 2


def owner():
    return Owner(tiny_llama(seed=0), pad_id=0)


def cfg(**kw):
    kw = {"r": 16, "max_new_tokens": 6, "batch_stage1": 64, "batch_stage2": 32, "epochs_stage1": 3,
          "epochs_stage2": 3, "eval_every": 2, **kw}  # fmt: skip
    return make_config("pema", **kw)


PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
TARGETS = [[20, 21, 22], [23, 24, 25, 26], [27]]


def test_head_reproduces_the_owner_logits_from_pre_norm_states():
    o = owner()
    head = o.export_head()
    _, f, logits = o.begin(PROMPTS)
    torch.testing.assert_close(head.logits(f), logits, atol=1e-4, rtol=1e-4)
    post = tiny_llama(seed=0).model(input_ids=torch.tensor([PROMPTS[0]])).last_hidden_state[0, -1]
    assert not torch.allclose(f[0], post)  # f is before the final norm


def test_free_running_memory_rows_targets_stay_private_and_keys_are_the_owners_states():
    o = owner()
    c = cfg(append_stop_target=True)
    mem = build_memory(o, PROMPTS, TARGETS, c, STOP)
    traj = owner().greedy_trajectory(PROMPTS, c.max_new_tokens, {STOP})
    expected_rows = sum(
        min(len(t), s.shape[0]) + (1 if s.shape[0] > len(t) else 0) for (s, _), t in zip(traj, TARGETS)
    )
    assert mem.keys.shape == (expected_rows, 64) and mem.values.shape == (expected_rows,)
    assert mem.nbytes() == expected_rows * (64 * 4 + 8)
    # only the prompts were ever sent to the owner: no gold target id crossed
    assert o.received == PROMPTS
    # row t of the first example is the owner's state after its own first t-1 greedy tokens
    states, own = traj[0]
    ids = torch.tensor([PROMPTS[0] + own[:1]])
    ref = Owner(tiny_llama(seed=0), pad_id=0)
    _, f, _ = ref.begin(ids.tolist())
    torch.testing.assert_close(mem.keys[1], f[0], atol=1e-5, rtol=1e-5)
    assert mem.values[: len(TARGETS[0])].tolist() == TARGETS[0][: states.shape[0]]
    assert ExternalMemory(mem.keys, mem.values).keys is mem.keys


def test_teacher_forcing_needs_the_disclosure_flag_and_then_sends_targets():
    with pytest.raises(ConfigError, match="allow_target_disclosure"):
        make_config("pema", memory_mode="teacher_forced")
    o = owner()
    mem = build_memory(
        o, PROMPTS, TARGETS, cfg(memory_mode="teacher_forced", allow_target_disclosure=True), STOP
    )
    assert o.received == [p + t for p, t in zip(PROMPTS, TARGETS)]
    assert mem.keys.shape[0] == sum(len(t) + 1 for t in TARGETS)  # + one stop row each


def test_data_owner_objects_hold_no_decoder_weights(tmp_path):
    o = owner()
    head = o.export_head()
    c = cfg()
    mem = build_memory(o, PROMPTS, TARGETS, c, STOP)
    adapter, _ = train_pema(head, mem, mem, c, log=lambda m: None)
    reachable = {**head.tensors(), **{f"adapter.{k}": v for k, v in adapter.state_dict().items()},
                 "memory.keys": mem.keys, "memory.values": mem.values}  # fmt: skip
    decoder = {tuple(p.shape) for n, p in tiny_llama(seed=0).named_parameters() if ".layers." in n}
    allowed = {(256, 64), (64,), (16, 64), (64, 16), (), tuple(mem.keys.shape), tuple(mem.values.shape)}
    for name, t in reachable.items():
        assert tuple(t.shape) in allowed, name
    assert not any(tuple(t.shape) in decoder - allowed for t in reachable.values())
    total = sum(t.numel() for t in reachable.values())
    assert total <= 256 * 64 + 64 + 3 * 16 * 64 + 1 + mem.keys.numel() + mem.values.numel()


def test_two_stages_train_2rd_parameters_each_and_b_rct_is_frozen_in_stage_two(monkeypatch):
    o = owner()
    head = o.export_head()
    c = cfg()
    mem = build_memory(o, PROMPTS, TARGETS, c, STOP)
    seen = []
    original = torch.optim.Adam.__init__

    def spy(self, params, *a, **kw):
        params = list(params)
        seen.append(sum(p.numel() for p in params))
        original(self, params, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "__init__", spy)
    snapshots = {}

    def log(msg):
        if msg.startswith("stage 2"):
            snapshots["b_rct"] = adapter_ref[0].pema_B_rct.detach().clone()

    adapter_ref = []
    from slimtune.recipes import pema as recipe

    real = recipe.PEMAAdapter

    def capture(*a, **kw):
        adapter_ref.append(real(*a, **kw))
        return adapter_ref[0]

    monkeypatch.setattr(recipe, "PEMAAdapter", capture)
    adapter, history = train_pema(head, mem, mem, c, log=log)
    assert seen == [2 * 16 * 64, 2 * 16 * 64]
    assert torch.equal(adapter.pema_B_rct, snapshots["b_rct"])
    assert adapter.pema_B_pd.abs().sum() > 0 and history["stage2"]


def test_adapter_has_no_residual_and_starts_uniform():
    c = cfg()
    a = PEMAAdapter(64, c).eval()
    head = owner().export_head()
    x = torch.randn(3, 64)
    p = torch.softmax(head.logits(a.predict_hidden(x)), -1)
    torch.testing.assert_close(p, torch.full_like(p, 1 / 256))  # B = 0: P_PEMA uniform
    with torch.no_grad():
        a.pema_B_pd.normal_()
    torch.testing.assert_close(a.predict_hidden(x), (1 / 16) * x @ a.pema_A.t() @ a.pema_B_pd.t())


def test_gradual_unrolling_closed_form():
    lams = [gu_lambda(t, 0.9, 10) for t in range(12)]
    expected = [0.9] + [(0.9 * (1 - min(t, 9) / 10)) ** 2 for t in range(1, 12)]
    assert lams == pytest.approx(expected)
    assert lams[:3] == pytest.approx([0.9, 0.6561, 0.5184]) and lams[-1] == pytest.approx(0.0081)
    # the reference's minimum share p: λ = (1 − p/100) c² + p/100 (spec §4), e.g. p = 25 %
    floor = [gu_lambda(t, 0.9, 10, 0.25) for t in range(12)]
    assert floor[0] == 0.9 and floor[1] == pytest.approx(0.75 * 0.6561 + 0.25)
    assert floor[-1] == pytest.approx(0.75 * 0.0081 + 0.25)


def test_gu_horizons_use_only_test_time_lengths():
    from slimtune.recipes.pema import gu_horizons

    assert gu_horizons(cfg(gu_ratio=1.5), [30, 40], [1, 4]) == [2, 6]
    assert gu_horizons(cfg(gu_ratio=1.5, gu_horizon="prompt_and_source"), [30, 40], [1, 4]) == [32, 46]
    with pytest.raises(ConfigError, match="gu_horizon"):
        make_config("pema", gu_horizon="reference")


def test_mixture_math_and_exact_endpoints():
    g = torch.Generator().manual_seed(0)
    lp1 = torch.log_softmax(torch.randn(4, 50, generator=g), -1)
    lp2 = torch.log_softmax(torch.randn(4, 50, generator=g), -1)
    lam = torch.tensor([0.0, 0.3, 0.9, 1.0])
    mixed = mix_log_probs(lp1, lp2, lam)
    assert torch.equal(mixed[0], lp1[0]) and torch.equal(mixed[3], lp2[3])
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(4))
    ref = lam[:, None] * lp2.exp() + (1 - lam[:, None]) * lp1.exp()
    torch.testing.assert_close(mixed.exp(), ref, atol=1e-6, rtol=1e-6)


def test_lambda_zero_reproduces_hf_greedy_exactly_and_batching_is_per_sequence():
    c = cfg(lambda_max=0.0, max_new_tokens=8)
    a = PEMAAdapter(64, c).eval()
    with torch.no_grad():
        a.pema_B_pd.normal_()
    o = owner()
    head = o.export_head()
    got = pema_generate(o, head, a, PROMPTS, [5, 5, 5], c, stop_ids=set(), batch_size=3)
    model = tiny_llama(seed=0).eval()
    for p, seq in zip(PROMPTS, got):
        ref = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert seq == ref[0, len(p) :].tolist()
    c2 = cfg(lambda_max=0.9, max_new_tokens=8)
    batched = pema_generate(owner(), head, a, PROMPTS, [3, 7, 5], c2, stop_ids=set(), batch_size=3)
    single = [
        pema_generate(owner(), head, a, [p], [h], c2, stop_ids=set())[0] for p, h in zip(PROMPTS, [3, 7, 5])
    ]
    assert batched == single
    assert math.isclose(gu_lambda(0, 0.9, 3), 0.9)


def test_cli_workflow_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, instr_jsonl, capsys):
    import json

    import yaml

    from slimtune.cli import main

    raw = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"path": str(instr_jsonl), "eval_path": str(instr_jsonl), "eval_size": 4},
        "train": {"output_dir": str(tmp_path / "pema")},
        "method": {"name": "pema", "r": 8, "max_new_tokens": 4, "epochs_stage1": 1, "epochs_stage2": 2,
                   "batch_stage1": 16, "batch_stage2": 16, "eval_every": 1},
    }  # fmt: skip
    path = tmp_path / "pema.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["pema", "train", str(path)]) == 2  # nothing built yet
    assert "run `slimtune pema build-memory` first" in capsys.readouterr().err
    assert main(["train", str(path)]) == 2  # not a single training run
    assert "is a workflow, not a trainer method" in capsys.readouterr().err
    assert main(["pema", "build-memory", str(path)]) == 0
    assert main(["pema", "build-memory", str(path)]) == 2  # never overwrites
    capsys.readouterr()
    assert main(["pema", "train", str(path)]) == 0
    assert main(["pema", "generate", str(path)]) == 0
    report = json.loads((tmp_path / "pema" / "generate" / "results.json").read_text())
    assert set(report["results"]) == {"base", "pema_constant", "pema_gu"}
    assert report["split"] == "test" and report["pairs"] == 4
    assert main(["pema", "generate", str(path)]) == 2  # never overwrites
    capsys.readouterr()
    # decoding settings are chosen on the data owner's dev pairs, into a directory of one's choice
    out = tmp_path / "dev-prompt-horizon"
    assert main(["pema", "generate", str(path), "method.gu_horizon=prompt_and_source", "--split", "dev",
                 "--out", str(out)]) == 0  # fmt: skip
    dev = json.loads((out / "results.json").read_text())
    assert dev["split"] == "dev" and dev["gu_horizon"] == "prompt_and_source"
    assert dev["pairs"] == max(1, int(len(instr_jsonl.read_text().splitlines()) * 0.1))
    assert main(["pema", "train", str(path), "--split", "dev"]) == 2
    assert "--split and --out belong to" in capsys.readouterr().err
    summary = json.loads((tmp_path / "pema" / "adapter" / "train.json").read_text())
    assert summary["trainable_per_stage"] == 2 * 8 * 64
    raw["train"]["output_dir"] = str(tmp_path / "x-{time}")
    path.write_text(yaml.safe_dump(raw))
    assert main(["pema", "build-memory", str(path)]) == 2
    assert "fixed path" in capsys.readouterr().err

"""PEMA's entry points outside its recipe: the `slimtune pema` command (its registry entry names this module as
its ``recipe``, and the CLI asks it to add its command) and its capability probe of the owner side."""

from __future__ import annotations

import torch

from slimtune.core.errors import UserError
from slimtune.methods.pema.config import PEMAConfig


def add_command(sub) -> None:
    pm = sub.add_parser(
        PEMAConfig.name, help="PEMA offsite tuning: build-memory (owner), train (data owner), generate"
    )
    pm.add_argument("step", choices=["build-memory", "train", "generate"])
    pm.add_argument("config", help="CONFIG.yaml with method.name: pema and a fixed train.output_dir")
    pm.add_argument("overrides", nargs="*")
    pm.add_argument(
        "--split",
        choices=["test", "dev"],
        default="test",
        help="generate: the held-out test pairs, or the data owner's dev pairs (to choose decoding settings)",
    )
    pm.add_argument("--out", help="generate: a new directory for results.json (default: OUTPUT_DIR/generate)")
    pm.set_defaults(fn=run_command)


def run_command(args) -> int:
    from slimtune.recipes import pema as workflow
    from slimtune.training import config as C

    cfg = C.load_config(args.config, args.overrides)
    if args.step != "generate" and (args.split != "test" or args.out):
        raise UserError("--split and --out belong to `slimtune pema generate`")
    if args.step == "generate":
        workflow.generate(cfg, split=args.split, out_dir=args.out)
    else:
        {"build-memory": workflow.build, "train": workflow.train}[args.step](cfg)
    return 0


def compare_cell(config, run_dir, run) -> int:
    """`slimtune compare`'s cell: the three steps on ``config`` (whose ``train.output_dir`` is ``run_dir``), each
    through ``run`` (a `slimtune` argument list -> exit code), then ``run_dir/results.json`` in a trainer run's
    shape: ``after`` holds the score of PEMA with Gradual Unrolling on the held-out pairs (its constant-λ and
    base scores beside it), ``train_wall_s`` and ``peak_bytes`` are the data owner's training (``adapter/
    train.json``: the process that holds no model). Returns the first failing step's exit code, or 0."""
    import json
    from pathlib import Path

    from slimtune.core.files import read_json, write_atomic

    for step in ("build-memory", "train", "generate"):
        code = run([PEMAConfig.name, step, str(config)])
        if code:
            return code
    run_dir = Path(run_dir)
    trained, generated = (
        read_json(run_dir / "adapter" / "train.json"),
        read_json(run_dir / "generate" / "results.json"),
    )
    scores = generated["results"]
    result = {
        "method": PEMAConfig.name,
        "after": {**_scores(scores["pema_gu"]), "examples": generated["pairs"]},
        "pema_constant": _scores(scores["pema_constant"]),
        "base_greedy": _scores(scores["base"]),
        "train_wall_s": trained["seconds"],
        "peak_bytes": trained["peak_rss_bytes"],
        "peak_is": "the data owner's training process (no model loaded)",
    }
    write_atomic(run_dir / "results.json", json.dumps(result, indent=2))
    return 0


def _scores(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "seconds"}


def probe_family(family: str) -> None:
    """PEMA's owner side: the exported head reproduces the model's logits from the final-layer states (checked
    inside ``export_head``), and λ = 0 generation equals the model's own greedy generation."""
    from slimtune.methods.pema.layer import PEMAAdapter
    from slimtune.methods.pema.owner import Owner
    from slimtune.models.families import tiny_model
    from slimtune.recipes.pema import pema_generate

    model = tiny_model(family)
    owner = Owner(model, pad_id=0)
    head = owner.export_head()
    cfg = PEMAConfig(r=8, max_new_tokens=6)
    torch.manual_seed(0)
    adapter = PEMAAdapter(head.weight.shape[1], cfg).eval()
    with torch.no_grad():
        adapter.pema_B_pd.normal_()
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    got = pema_generate(owner, head, adapter, prompts, [3, 3], cfg, stop_ids=set(), constant_lambda=0.0)
    for p, seq in zip(prompts, got):
        ref = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        _expect(seq == ref[0, len(p) :].tolist(), f"λ = 0 generation differs from greedy: {seq}")
    mixed = pema_generate(owner, head, adapter, prompts, [3, 3], cfg, stop_ids=set(), constant_lambda=1.0)
    _expect(all(len(seq) == 6 for seq in mixed), "λ = 1 generation did not run")


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)

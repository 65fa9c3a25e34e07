"""`slimtune pema build-memory | train | generate CONFIG.yaml`: the two-party workflow from one config.

All three steps share ``train.output_dir`` (a fixed path):
- ``owner/head.safetensors``: what the owner hands over once (final norm, LM head);
- ``memory/{train,dev}.safetensors`` + ``memory/meta.json``: the external memory (owner states, gold targets);
- ``adapter/pema.safetensors`` + ``adapter/train.json``: the data owner's trained adapter (A₂, B_pd, B_rct);
- ``generate/results.json``: BLEU (or the task metric) of the base model, PEMA with constant λ, PEMA with GU.
``train`` never loads the model: the data owner's process holds the head, the memory and the adapter only.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

from slimtune.errors import UserError
from slimtune.memory import peak_rss_bytes, runtime_rss_bytes
from slimtune.methods.pema.config import PEMAConfig
from slimtune.methods.pema.data_owner import (
    ExternalMemory,
    PEMAAdapter,
    build_memory,
    pema_generate,
    train_pema,
)
from slimtune.methods.pema.owner import HeadBundle, Owner


def _workdir(cfg) -> Path:
    out = str(cfg.train.output_dir)
    if "{" in out:
        raise UserError(
            "train.output_dir: the pema steps share one directory; give a fixed path (no {placeholders})"
        )
    return Path(out)


def _fresh(path: Path) -> Path:
    if path.exists() and any(path.iterdir()):
        raise UserError(f"'{path}' already holds files; remove it or choose another train.output_dir")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _need(path: Path, step: str) -> Path:
    if not path.exists():
        raise UserError(f"'{path}' not found: run `slimtune pema {step}` first")
    return path


def _records(cfg) -> tuple[list[dict], list[dict]]:
    if cfg.data.task:
        from slimtune.tasks import get_task

        train, test = get_task(cfg.data.task).load(cfg.data.seed)
    else:
        from slimtune.data import read_records

        train = [r for _, r in read_records(cfg.data.path)]
        test = [r for _, r in read_records(cfg.data.eval_path)] if cfg.data.eval_path else []
    for where, recs in (("train", train), ("eval", test)):
        for i, r in enumerate(recs):
            if "instruction" not in r or "output" not in r:
                raise UserError(
                    f"data ({where}) row {i + 1}: pema needs instruction-format rows (instruction, output)"
                )
    return train, test[: cfg.data.eval_size] if cfg.data.eval_size else test


def _encode(tok, rec: dict) -> tuple[list[int], list[int]]:
    from slimtune.data import instruction_prompt

    prompt = instruction_prompt(tok, rec["instruction"], rec.get("input", ""))
    return (
        tok(prompt, add_special_tokens=False).input_ids,
        tok(rec["output"], add_special_tokens=False).input_ids,
    )


def _stop_id(tok) -> int:
    end = tok.convert_tokens_to_ids("<|im_end|>")
    return end if isinstance(end, int) and end != tok.unk_token_id else tok.eos_token_id


def _pema_cfg(cfg) -> PEMAConfig:
    if not isinstance(cfg.method, PEMAConfig):
        raise UserError(f"method.name: 'slimtune pema' needs method.name: pema, got '{cfg.method.name}'")
    return cfg.method


def _dev_split(train: list[dict], pcfg: PEMAConfig) -> dict[str, list[dict]]:
    """The data owner's training pairs split into the memory's train and dev parts (seeded, reproducible)."""
    order = list(range(len(train)))
    random.Random(pcfg.seed).shuffle(order)
    n_dev = max(1, int(len(train) * pcfg.dev_fraction))
    return {"dev": [train[i] for i in order[:n_dev]], "train": [train[i] for i in order[n_dev:]]}


def gu_horizons(pcfg: PEMAConfig, prompt_lens: list[int], source_lens: list[int]) -> list[int]:
    """GU horizon per sequence from what is known at test time: ceil(gu_ratio x source tokens), plus the prompt
    length when gu_horizon is prompt_and_source (closest to the reference's prompt+reference length)."""
    extra = prompt_lens if pcfg.gu_horizon == "prompt_and_source" else [0] * len(prompt_lens)
    return [max(1, e + math.ceil(pcfg.gu_ratio * n)) for e, n in zip(extra, source_lens)]


def build(cfg, log=print) -> dict:
    """Owner side (in this process, behind the ``Owner`` API): export the head, build train and dev memories."""
    from slimtune.models import load

    pcfg, root = _pema_cfg(cfg), _workdir(cfg)
    train, _ = _records(cfg)
    model, tok = load(cfg.model.name, cfg.model.dtype)
    owner = Owner(model, tok.pad_token_id if tok.pad_token_id is not None else _stop_id(tok))
    split = _dev_split(train, pcfg)
    out_owner, out_mem = _fresh(root / "owner"), _fresh(root / "memory")
    head = owner.export_head()
    save_file(head.tensors(), str(out_owner / "head.safetensors"), metadata={"eps": str(head.eps)})
    meta = {"mode": pcfg.memory_mode, "append_stop_target": pcfg.append_stop_target}
    t0 = time.perf_counter()
    for name, recs in split.items():
        enc = [_encode(tok, r) for r in recs]
        mem = build_memory(owner, [p for p, _ in enc], [t for _, t in enc], pcfg, _stop_id(tok))
        mem.save(out_mem / f"{name}.safetensors")
        meta[name] = {"pairs": len(recs), "rows": int(mem.keys.shape[0]), "bytes": mem.nbytes()}
        log(
            f"pema: {name} memory: {len(recs)} pairs -> {mem.keys.shape[0]} rows ({mem.nbytes() / 1e6:.1f} MB)"
        )
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    (out_mem / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_head(root: Path) -> HeadBundle:
    path = _need(root / "owner" / "head.safetensors", "build-memory")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        eps = float(fh.metadata()["eps"])
    t = load_file(str(path))
    return HeadBundle(t["head.weight"], t["head.norm_weight"], eps)


def train(cfg, log=print) -> dict:
    """Data-owner side: no model is loaded; the head, the memory and the adapter are all this process holds."""
    pcfg, root = _pema_cfg(cfg), _workdir(cfg)
    runtime = runtime_rss_bytes()  # before the head and the memory are loaded
    head = load_head(root)
    mem = _need(root / "memory", "build-memory")
    tr, dev = ExternalMemory.load(mem / "train.safetensors"), ExternalMemory.load(mem / "dev.safetensors")
    out = _fresh(root / "adapter")
    t0 = time.perf_counter()
    adapter, history = train_pema(head, tr, dev, pcfg, log=lambda m: log(f"pema: {m}"))
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(out / "pema.safetensors"))
    summary = {
        "trainable_per_stage": 2 * pcfg.r * tr.keys.shape[1],
        "rows": int(tr.keys.shape[0]),
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_bytes": peak_rss_bytes(),
        "runtime_rss_bytes": runtime,
        "history": history,
    }
    (out / "train.json").write_text(json.dumps(summary, indent=2))
    log(
        f"pema: trained in {summary['seconds']} s, peak RSS {summary['peak_rss_bytes'] / 1e6:.0f} MB "
        f"({(summary['peak_rss_bytes'] - runtime) / 1e6:.0f} MB above the {runtime / 1e6:.0f} MB runtime)"
    )
    return summary


def generate(cfg, log=print, split: str = "test", out_dir: str | None = None) -> dict:
    """Base greedy, PEMA with constant λ_max, PEMA with Gradual Unrolling, on the held-out pairs (``split``
    test) or on the data owner's dev pairs (``split`` dev: for choosing decoding settings without the test set).
    """
    from slimtune.models import load

    pcfg, root = _pema_cfg(cfg), _workdir(cfg)
    head = load_head(root)
    state = load_file(str(_need(root / "adapter" / "pema.safetensors", "train")))
    adapter = PEMAAdapter(head.weight.shape[1], pcfg)
    adapter.load_state_dict(state)
    adapter.eval()
    train_recs, test = _records(cfg)
    if split == "dev":
        test = _dev_split(train_recs, pcfg)["dev"]
    if not test:
        raise UserError("data: no held-out pairs to generate for (use a task or data.eval_path)")
    out = _fresh(Path(out_dir) if out_dir else root / ("generate" if split == "test" else "generate-dev"))
    model, tok = load(cfg.model.name, cfg.model.dtype)
    stop = _stop_id(tok)
    owner = Owner(model, tok.pad_token_id if tok.pad_token_id is not None else stop)
    prompts = [_encode(tok, r)[0] for r in test]
    src = [len(tok(r.get("input") or r["instruction"], add_special_tokens=False).input_ids) for r in test]
    horizons = gu_horizons(pcfg, [len(p) for p in prompts], src)
    refs = [r["output"] for r in test]
    results, texts = {}, {}
    for name, kw in (
        ("base", {"adapter": None}),
        ("pema_constant", {"adapter": adapter, "constant_lambda": pcfg.lambda_max}),
        ("pema_gu", {"adapter": adapter}),
    ):
        t0 = time.perf_counter()
        ids = pema_generate(owner, head, kw.pop("adapter"), prompts, horizons, pcfg, {stop}, **kw)
        preds = [tok.decode([t for t in seq if t != stop], skip_special_tokens=True).strip() for seq in ids]
        results[name] = {**_score(cfg, preds, refs), "seconds": round(time.perf_counter() - t0, 1)}
        texts[name] = preds
        log(f"pema: {name}: {results[name]}")
    samples = [{"input": r.get("input", ""), "reference": r["output"], **{k: texts[k][i] for k in texts}}
               for i, r in enumerate(test[:5])]  # fmt: skip
    report = {
        "split": split,
        "pairs": len(test),
        "lambda_max": pcfg.lambda_max,
        "gu_ratio": pcfg.gu_ratio,
        "gu_horizon": pcfg.gu_horizon,
        "results": results,
        "samples": samples,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def _score(cfg, preds: list[str], refs: list[str]) -> dict:
    if cfg.data.task:
        from slimtune.tasks import get_task

        return get_task(cfg.data.task).score(preds, refs)
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(preds, [refs]).score}


def apply_pema(model, cfg):
    raise UserError(
        "method pema is a two-party workflow, not a single training run: use `slimtune pema build-memory CONFIG`, "
        "`slimtune pema train CONFIG`, `slimtune pema generate CONFIG` (docs/methods/pema.md)"
    )


__all__ = ["apply_pema", "build", "generate", "train"]

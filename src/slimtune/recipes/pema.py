"""PEMA's recipe: `slimtune pema build-memory | train | generate CONFIG.yaml`, the two-party workflow from one
config (the other recipe is :func:`slimtune.recipes.train.train`). PEMA is a workflow, not a trainer method: it runs its
own two-stage Adam loop on the external memory (``method.lr``, ``method.seed``, ``method.epochs_*``); a config
that sets ``train.*`` keys other than ``output_dir`` is refused when validated.


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

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.core.errors import UserError
from slimtune.core.memory import peak_rss_bytes, runtime_rss_bytes
from slimtune.methods.pema.config import PEMAConfig
from slimtune.methods.pema.layer import (
    ExternalMemory,
    PEMAAdapter,
    build_memory,
    gu_lambda,
    mix_log_probs,
    prediction_loss,
    reconstruction_loss,
)
from slimtune.methods.pema.owner import HeadBundle, Owner

# ---------------------------------------------------------------- the two stages and generation


def _train(
    adapter, params, loss_fn, train: ExternalMemory, dev: ExternalMemory, batch: int, epochs: int, cfg, log
):
    """Adam over shuffled memory rows; validation every ``eval_every`` steps; stop when the dev loss is above both
    previous checks (the reference's rule). Returns the history of (step, train loss, dev loss)."""
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    history, checks, step = [], [], 0
    for _epoch in range(epochs):
        order = torch.randperm(train.keys.shape[0], generator=gen)
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            adapter.train()
            loss = loss_fn(train.keys[idx], train.values[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % cfg.eval_every == 0:
                adapter.eval()
                with torch.no_grad():
                    dev_loss = float(loss_fn(dev.keys, dev.values))
                history.append((step, float(loss), dev_loss))
                log(f"step {step}: train {float(loss):.4f}, dev {dev_loss:.4f}")
                if len(checks) >= 2 and dev_loss > checks[-1] and dev_loss > checks[-2]:
                    return history
                checks.append(dev_loss)
    return history


def train_pema(
    head: HeadBundle, train: ExternalMemory, dev: ExternalMemory, cfg: PEMAConfig, log=print
) -> tuple[PEMAAdapter, dict]:
    """Stage 1 (reconstruction) then stage 2 (κ·MSE + (1 − κ)·CE); returns the adapter and the histories."""
    torch.manual_seed(cfg.seed)
    d = train.keys.shape[1]
    adapter = PEMAAdapter(d, cfg)
    if cfg.key_scale:
        adapter.key_scale.fill_(float(1.0 / train.keys.pow(2).mean().sqrt()))
    a = adapter
    log("stage 1: reconstruction")
    h1 = _train(
        a,
        [a.pema_A, a.pema_B_rct],
        lambda x, y: reconstruction_loss(a, x),
        train,
        dev,
        cfg.batch_stage1,
        cfg.epochs_stage1,
        cfg,
        log,
    )
    if not cfg.init_a2_from_stage1:
        with torch.no_grad():
            nn.init.kaiming_uniform_(a.pema_A, a=math.sqrt(5))
    a.pema_B_rct.requires_grad_(False)

    def joint(x, y):
        return cfg.kappa * reconstruction_loss(a, x) + (1 - cfg.kappa) * prediction_loss(a, head, x, y)

    log("stage 2: joint")
    h2 = _train(a, [a.pema_A, a.pema_B_pd], joint, train, dev, cfg.batch_stage2, cfg.epochs_stage2, cfg, log)
    a.eval()
    return a, {"stage1": h1, "stage2": h2}


@torch.no_grad()
def pema_generate(
    owner: Owner,
    head: HeadBundle,
    adapter: PEMAAdapter | None,
    prompts: list[list[int]],
    horizons: list[int],
    cfg: PEMAConfig,
    stop_ids: set[int],
    constant_lambda: float | None = None,
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy generation through the owner, mixing PEMA's distribution per step (λ per sequence)."""
    results: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        p, hz = prompts[start : start + batch_size], horizons[start : start + batch_size]
        session, f, logits = owner.begin(p)
        out = [[] for _ in p]
        alive = torch.ones(len(p), dtype=torch.bool)
        for t in range(cfg.max_new_tokens):
            lp = torch.log_softmax(logits.float(), dim=-1)
            if adapter is not None:
                if constant_lambda is not None:
                    lam = torch.full((len(p),), constant_lambda)
                else:
                    lam = torch.tensor([gu_lambda(t, cfg.lambda_max, h, cfg.gu_min) for h in hz])
                if bool((lam > 0).any()):
                    lp_pema = torch.log_softmax(head.logits(adapter.predict_hidden(f.float().cpu())), dim=-1)
                    lp = mix_log_probs(lp.cpu(), lp_pema, lam)
            nxt = lp.argmax(-1)
            for i in range(len(p)):
                if alive[i]:
                    out[i].append(int(nxt[i]))
                    if int(nxt[i]) in stop_ids:
                        alive[i] = False
            if not bool(alive.any()):
                break
            f, logits = owner.step(session, nxt)
        results.extend(out)
    return results


# ---------------------------------------------------------------- the three steps, sharing train.output_dir


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


def read_pairs(cfg) -> tuple[list[dict], list[dict]]:
    if cfg.data.task:
        from slimtune.data.tasks import get_task

        train, test = get_task(cfg.data.task).load(cfg.data.seed)
    else:
        from slimtune.data.records import read_records

        train = [r for _, r in read_records(cfg.data.path)]
        test = [r for _, r in read_records(cfg.data.eval_path)] if cfg.data.eval_path else []
    for where, recs in (("train", train), ("eval", test)):
        for i, r in enumerate(recs):
            if "instruction" not in r or "output" not in r:
                raise UserError(
                    f"data ({where}) row {i + 1}: pema needs instruction-format rows (instruction, output)"
                )
    return train, test[: cfg.data.eval_size] if cfg.data.eval_size else test


def encode_pair(tok, rec: dict) -> tuple[list[int], list[int]]:
    from slimtune.data.records import instruction_prompt

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


def dev_split(train: list[dict], pcfg: PEMAConfig) -> dict[str, list[dict]]:
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
    from slimtune.models.loading import load

    pcfg, root = _pema_cfg(cfg), _workdir(cfg)
    train, _ = read_pairs(cfg)
    model, tok = load(cfg.model.name, cfg.model.dtype)
    owner = Owner(model, tok.pad_token_id if tok.pad_token_id is not None else _stop_id(tok))
    split = dev_split(train, pcfg)
    out_owner, out_mem = _fresh(root / "owner"), _fresh(root / "memory")
    head = owner.export_head()
    save_file(head.tensors(), str(out_owner / "head.safetensors"), metadata=head.metadata())
    meta = {"mode": pcfg.memory_mode, "append_stop_target": pcfg.append_stop_target}
    t0 = time.perf_counter()
    for name, recs in split.items():
        enc = [encode_pair(tok, r) for r in recs]
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
        meta = fh.metadata()
    return HeadBundle.from_saved(load_file(str(path)), meta)


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
    from slimtune.models.loading import load

    pcfg, root = _pema_cfg(cfg), _workdir(cfg)
    head = load_head(root)
    state = load_file(str(_need(root / "adapter" / "pema.safetensors", "train")))
    adapter = PEMAAdapter(head.weight.shape[1], pcfg)
    adapter.load_state_dict(state)
    adapter.eval()
    train_recs, test = read_pairs(cfg)
    if split == "dev":
        test = dev_split(train_recs, pcfg)["dev"]
    if not test:
        raise UserError("data: no held-out pairs to generate for (use a task or data.eval_path)")
    out = _fresh(Path(out_dir) if out_dir else root / ("generate" if split == "test" else "generate-dev"))
    model, tok = load(cfg.model.name, cfg.model.dtype)
    stop = _stop_id(tok)
    owner = Owner(model, tok.pad_token_id if tok.pad_token_id is not None else stop)
    prompts = [encode_pair(tok, r)[0] for r in test]
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
    samples = [
        {"input": r.get("input", ""), "reference": r["output"], **{k: texts[k][i] for k in texts}}
        for i, r in enumerate(test[:5])
    ]
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
        from slimtune.data.tasks import get_task

        return get_task(cfg.data.task).score(preds, refs)
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(preds, [refs]).score}


__all__ = ["build", "generate", "gu_horizons", "pema_generate", "train", "train_pema"]

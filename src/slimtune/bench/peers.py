"""The peers `slimtune bench --peers hf` measures beside slimtune: what a user runs instead of slimtune.

``hf``: ``transformers.Trainer`` over the same model, for ``full`` (the model itself), ``lora`` (a peft LoRA
model with slimtune's LoRA settings: rank, alpha, dropout, targets) and ``qlora`` (the model loaded 4-bit through
``BitsAndBytesConfig`` as the peft/transformers QLoRA recipe does, then peft LoRA). Same rows, batch, thread count,
dtype, learning rate and clipping as the slimtune run; no evaluation, logging or saving. Each step is timed by a
``TrainerCallback`` (``on_step_begin`` → ``on_step_end``), and the peak RSS is reset after the warm-up steps, as
in slimtune's own worker. The peer's gradient checkpointing is off, as slimtune's is in the bench.
"""

from __future__ import annotations

import tempfile
import time

import torch

from slimtune.core import hostmem

PEERS = ("hf",)
"""The peers `slimtune bench --peers` knows (``hf``: transformers.Trainer, + peft for LoRA-family methods)."""


def covered(peer: str) -> tuple[str, ...]:
    """The slimtune methods ``peer`` has a counterpart for (their registry entries declare it)."""
    from slimtune.methods import METHODS

    return tuple(n for n, s in METHODS.items() if peer in s.peers)


def peer_label(peer: str, method: str) -> str:
    return f"{peer}:{method}"


def peer_runs(runs: list[dict], peers: list[str]) -> list[dict]:
    """The peer runs to add for ``runs``: one per peer and covered method, with the settings of that method's
    first run (a method's runs in several memory modes share one peer)."""
    out, seen = [], set()
    for peer in peers:
        for r in runs:
            if r["method"] in covered(peer) and not r.get("peer") and (peer, r["method"]) not in seen:
                seen.add((peer, r["method"]))
                settings = {
                    k: v for k, v in r.get("settings", {}).items() if k not in ("memory", "chunked_loss")
                }
                out.append(
                    {
                        "method": r["method"],
                        "settings": settings,
                        "peer": peer,
                        "kind": _peer_kind(r["method"]),
                    }
                )
    return out


def _peer_kind(method: str) -> dict:
    """What the peer process builds for ``method`` (read here: the peer does not import slimtune's methods)."""
    from slimtune.methods import get_spec

    spec = get_spec(method)
    return {"four_bit_base": spec.four_bit_base, "peft_lora": "peft" in spec.needs}


def _load_4bit(spec: dict, dtype: torch.dtype):
    """The model loaded as users load it for QLoRA: ``from_pretrained(..., quantization_config=nf4)``."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from slimtune.models import loading as models

    path = models.model_path(spec["model"])
    if path.is_file():
        raise ValueError(f"hf:qlora needs a model directory, not {path.name}: bitsandbytes quantizes at load")
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=q, dtype=dtype, local_files_only=True
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _peer_model(spec: dict, method_cfg):
    from slimtune.bench.worker import load_for_bench
    from slimtune.models import loading as models

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = models.resolve_dtype(spec.get("dtype", "auto"), device)
    if spec["peer_kind"]["four_bit_base"]:
        if spec.get("shape") or spec.get("model") == "tiny":
            raise ValueError("hf:qlora needs a model on disk (bitsandbytes quantizes at load)")
        from transformers import AutoTokenizer

        model = _load_4bit(spec, dtype)
        tok = AutoTokenizer.from_pretrained(models.model_path(spec["model"]), local_files_only=True)
    else:
        model, tok = load_for_bench(spec)
    if spec["peer_kind"]["peft_lora"]:  # (a LoRA-family method: its peer wraps peft's LoRA)
        from slimtune.methods.baselines.apply import (
            peft_lora,
        )  # peft's get_peft_model(LoraConfig(...)), no more

        model = peft_lora(model, method_cfg)
    return model, tok


def _timer(warmup: int, times: list[float]):
    """A ``TrainerCallback`` timing each optimizer step after ``warmup`` (peaks reset when the timed steps start)."""
    from transformers import TrainerCallback

    from slimtune.bench.worker import reset_host_peak

    cuda = torch.cuda.is_available()

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:
                reset_host_peak()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            if state.global_step > warmup:
                times.append(time.perf_counter() - self.t)

    return Timer()


def _train_hf(model, data: list[dict], spec: dict, cfg, times: list[float], losses: list[float]) -> None:
    """``warmup + steps`` steps of ``transformers.Trainer`` (no eval, logging or saving), timed and logged."""
    from transformers import Trainer, TrainingArguments

    class LossTrainer(Trainer):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            losses.append(float(loss.detach()))
            return loss

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=spec["batch"],
            max_steps=spec["steps"] + spec["warmup"],
            learning_rate=cfg.train.lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=cfg.train.max_grad_norm,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            seed=spec.get("seed", 0),
            disable_tqdm=True,
        )
        callbacks = [_timer(spec["warmup"], times)]
        LossTrainer(model=model, args=targs, train_dataset=data, callbacks=callbacks).train()


def run_hf(spec: dict) -> dict:
    """One ``transformers.Trainer`` measurement; the result has the fields of slimtune's worker."""
    from slimtune.bench.worker import bench_rows, host_peak_bytes, run_config, step_fields
    from slimtune.core import memory

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    cfg = run_config(spec)
    runtime = memory.runtime_rss_bytes(("peft", "transformers"))
    model, tok = _peer_model(spec, cfg.method)
    model.train()
    rows = bench_rows(spec, tok, model.config.vocab_size)
    data = [{"input_ids": r, "attention_mask": [1] * len(r), "labels": list(r)} for r in rows]
    times: list[float] = []
    losses: list[float] = []
    setup_s = time.perf_counter() - t0
    _train_hf(model, data, spec, cfg, times, losses)
    rss = host_peak_bytes()
    cuda = torch.cuda.is_available()
    cuda_peak = torch.cuda.max_memory_allocated() if cuda else None
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "peak_rss_bytes": rss,
        "cuda_peak_allocated_bytes": cuda_peak,
        "peak_bytes": cuda_peak if cuda else rss,
        "memory_by_role": {},
        **step_fields(spec, times, losses),
        "setup_s": setup_s,
        "runtime_rss_bytes": runtime,
        "device": "cuda" if cuda else "cpu",
        **hostmem.report(),  # allocator, huge_pages
        "peer": spec["peer"],
    }


def peer_ratios(runs: list[dict]) -> dict:
    """Each slimtune run against its method's peer in the same invocation: memory = peer peak / slimtune peak,
    speed = slimtune tokens/s / peer tokens/s (above 1: slimtune is ahead)."""
    ok = [r for r in runs if r.get("ok")]
    peers = {r["method"]: r for r in ok if r.get("peer")}
    out = {}
    for r in ok:
        p = peers.get(r["method"])
        if r.get("peer") or r.get("probe") or p is None:
            continue
        out[r["label"]] = {
            "peer": p["label"],
            "memory": p["peak_bytes"] / r["peak_bytes"],
            "speed": r["tokens_per_s"] / p["tokens_per_s"],
        }
    return out


if __name__ == "__main__":  # python -m slimtune.bench.peers SPEC.json OUT.json (one peer run, as the worker)
    import sys

    from slimtune.bench.worker import main

    sys.exit(main(fn=run_hf))

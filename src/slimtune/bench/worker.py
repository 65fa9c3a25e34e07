"""One benchmark measurement, run in its own process: ``python -m slimtune.bench.worker SPEC.json OUT.json``.

It loads the model, applies the method, and times ``warmup + steps`` optimizer steps of the same
:class:`~slimtune.training.trainer.Trainer` step that `slimtune train` runs, on real text when a tokenizer is available.
Peak host memory is measured for the training phase alone (Linux's VmHWM is reset after set-up).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from slimtune.bench.figures import loss_path, loss_term_bytes, matmul_flops_per_s
from slimtune.core import hostmem, memory
from slimtune.modules import compiling


def reset_host_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) so later peaks exclude set-up; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def host_peak_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return memory.peak_rss_bytes()


def _text_rows(tok, n_rows: int, seq_len: int, seed: int) -> list[list[int]]:
    """``n_rows`` rows of exactly ``seq_len`` real tokens (sentiment reviews, packed)."""
    from slimtune.data.tasks import get_task

    train, _ = get_task("sentiment").load(seed)
    flat: list[int] = []
    for r in train:
        flat += tok(f"{r['input']} Sentiment: {r['output']}.", add_special_tokens=False)["input_ids"]
        flat.append(tok.eos_token_id)
        if len(flat) >= n_rows * seq_len:
            break
    return [flat[i * seq_len : (i + 1) * seq_len] for i in range(n_rows)]


def _random_rows(vocab: int, n_rows: int, seq_len: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n_rows, seq_len), generator=g).tolist()


def load_for_bench(spec: dict):
    """(model, tokenizer or None) for a spec naming ``model`` (alias/dir/gguf) or ``shape``."""
    from slimtune.models import loading as models

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = models.resolve_dtype(spec.get("dtype", "auto"), device)
    if spec.get("shape"):
        from slimtune.models.shapes import build_shape

        return build_shape(spec["shape"], dtype=dtype, device=device, seed=spec.get("seed", 0)), None
    if spec.get("model") == "tiny":
        return models.tiny_llama(seed=spec.get("seed", 0)).to(dtype), None
    return models.load(spec["model"], dtype, device)


def run_nf4_forward(spec: dict) -> dict:
    """The probe ``nf4-forward``: time the 4-bit backbone's forward alone (no autograd, without the LM head).

    It bounds what a method that only runs the frozen 4-bit backbone forward (QST) can gain over QLoRA:
    ceiling = QLoRA step time / this time.
    """
    from slimtune.modules.quant.backbone import quantize_decoder

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model, tok = load_for_bench(spec)
    quantize_decoder(model, spec.get("settings", {}).get("backend", "auto"), double_quant=True)
    device = next(model.parameters()).device
    batch, seq_len, steps, warmup = spec["batch"], spec["seq_len"], spec["steps"], spec["warmup"]
    rows = (
        _text_rows(tok, batch, seq_len, 0)
        if tok is not None
        else _random_rows(model.config.vocab_size, batch, seq_len, 0)
    )
    ids = torch.tensor(rows, device=device)
    times, head_times = [], []
    for i in range(steps + warmup):
        if i == warmup:
            reset_host_peak()
        with torch.no_grad():
            t = time.perf_counter()
            hidden = model.model(input_ids=ids).last_hidden_state
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_body = time.perf_counter() - t
            model.lm_head(hidden)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_all = time.perf_counter() - t
        if i >= warmup:
            times.append(t_body)
            head_times.append(t_all)
    median = sorted(times)[len(times) // 2]
    rss = host_peak_bytes()
    return {
        "trainable_params": 0,
        "total_params": sum(p.numel() for p in model.parameters()),
        "peak_rss_bytes": rss,
        "cuda_peak_allocated_bytes": None,
        "peak_bytes": rss,
        "memory_by_role": {},
        "step_time_median_s": median,
        "step_times_s": times,
        "tokens_per_s": batch * seq_len / median,
        "forward_with_head_median_s": sorted(head_times)[len(head_times) // 2],
        "loss_first": None,
        "loss_last": None,
        "losses": [],
        "probe": True,
    }


TRAIN_KEYS = (
    "memory",
    "chunked_loss",
    "grad_checkpointing",
    "compile",
    "optimizer_in_backward",
    "engine",
    "zero_stage",
)
"""Training settings a bench run may set (``lora[memory=low]``), beside the method's own."""
RUN_KEYS = ("baseline", "lr", *TRAIN_KEYS)
"""Keys of a bench run's ``settings`` that are not the method's."""


def run_config(spec: dict):
    """The :class:`~slimtune.training.config.RunConfig` of a measurement: what `slimtune train` would run, held at the
    schedules' first rung, with a constant learning rate; clipping at 1.0 as `slimtune train` clips, except with
    ``optimizer_in_backward`` (which cannot clip)."""
    from slimtune.methods import make_config
    from slimtune.training import config as C

    given = spec.get("settings", {})
    settings = {k: v for k, v in given.items() if k not in RUN_KEYS}
    steps = spec["steps"] + spec["warmup"]
    in_backward = bool(given.get("optimizer_in_backward", False))
    train = C.TrainConfig(
        steps=steps,
        batch_size=spec["batch"],
        lr=given.get("lr", 1e-4),
        schedule="constant",
        grad_checkpointing=bool(given.get("grad_checkpointing", spec.get("grad_checkpointing", False))),
        chunked_loss=bool(given.get("chunked_loss", True)),
        memory=given.get("memory", "standard"),
        compile=bool(given.get("compile", False)),
        optimizer_in_backward=in_backward,
        max_grad_norm=None if in_backward else C.TrainConfig.max_grad_norm,
        engine=given.get("engine", "auto"),
        zero_stage=int(given.get("zero_stage", 2)),
        seed=spec.get("seed", 0),
        threads=spec.get("threads"),
    )
    model = C.ModelConfig(name=spec.get("model") or "smollm2-135m", dtype=spec.get("dtype", "auto"))
    return C.RunConfig(model=model, train=train, method=make_config(spec["method"], **settings))


def bench_rows(spec: dict, tok, vocab: int) -> list[list[int]]:
    n_rows = spec["batch"] * (spec["steps"] + spec["warmup"])
    if tok is not None:
        return _text_rows(tok, n_rows, spec["seq_len"], spec.get("seed", 0))
    return _random_rows(vocab, n_rows, spec["seq_len"], spec.get("seed", 0))


def _timed_steps(trainer, spec: dict, on_last_grads) -> tuple[list[float], list[float]]:
    """Run warmup + steps trainer steps; the peaks are reset after warmup; returns (losses, timed seconds)."""
    cuda = trainer.acc.device.type == "cuda"
    total, warmup = spec["steps"] + spec["warmup"], spec["warmup"]
    trainer.model.train()
    losses, times = [], []
    for i in range(total):
        if i == warmup:
            reset_host_peak()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t = time.perf_counter()
        loss, _, _ = trainer.train_step(with_grads=on_last_grads if i == total - 1 else None)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            dt = start.elapsed_time(end) / 1000
        else:
            dt = time.perf_counter() - t
        losses.append(loss)
        if i >= warmup:
            times.append(dt)
    return losses, times


def _count_flops(trainer) -> int:
    """FLOPs of one more trainer step under ``FlopCounterMode``, after the measured steps: the counter's module
    hooks keep activations alive that gradient checkpointing frees, and a heap grown by them stays in the RSS."""
    from torch.utils.flop_counter import FlopCounterMode

    # (eagerly: a compiled step's FLOPs are the same products, and compiled kernels bypass the counter)
    with compiling.eager(), FlopCounterMode(display=False) as counter:
        trainer.train_step()
    return counter.get_total_flops()


def run(spec: dict) -> dict:
    """One measurement: ``api.prepare`` (as `slimtune train`), then the trainer's own steps, timed."""
    from slimtune.data.records import Encoded
    from slimtune.recipes import train as api
    from slimtune.training.trainer import Trainer

    t0 = time.perf_counter()
    runtime = memory.runtime_rss_bytes(("peft", "transformers"))
    cfg = run_config(spec)
    random_weights = spec.get("shape") or spec.get("model") == "tiny"
    p = api.prepare(cfg, (lambda: load_for_bench(spec)) if random_weights else None)
    adapted, tok = p.adapted, p.tok
    rows = bench_rows(spec, tok, adapted.model.config.vocab_size)
    data = Encoded(rows, [list(r) for r in rows])
    pad = SimpleNamespace(pad_token_id=tok.pad_token_id if tok is not None else 0)
    role_bytes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            adapted, pad, cfg.train, data, Encoded([], []), [], None, Path(tmp), hold_schedules=True
        )
        setup_s, load_peak = time.perf_counter() - t0, host_peak_bytes()

        def snapshot() -> None:  # the last step, while its gradients exist
            role_bytes.update(adapted.memory_report())
            role_bytes["optimizer"] = memory.optimizer_bytes(trainer.optimizer)

        losses, times = _timed_steps(trainer, spec, snapshot)
        if trainer.acc.num_processes > 1:
            return _per_rank_measurement(
                spec, adapted, trainer, losses, times, role_bytes, setup_s, load_peak, tok
            )
        # the peaks of the timed steps, read before the extra step under the FLOP counter (whose hooks keep
        # activations alive) and the loss-term measurement (full logits) raise them
        out = _measurement(spec, adapted, trainer, losses, times, role_bytes, setup_s, load_peak, tok)
        flops = _count_flops(trainer)
        first = {
            k: torch.tensor(v[: spec["batch"]], device=trainer.acc.device)
            for k, v in (("input_ids", rows), ("labels", rows))
        }
        first["attention_mask"] = torch.ones_like(first["input_ids"])
        loss_bytes = loss_term_bytes(adapted, trainer.model, first)
    rate = matmul_flops_per_s(trainer.acc.device)
    compute = {
        "flops_per_step": flops,
        "matmul_flops_per_s": rate,
        "flop_limit_step_s": flops / rate,
        "flop_share": flops / rate / out["step_time_median_s"],
    }
    out = {**out, "compute": compute, "loss_path": loss_path(trainer), "loss_term_bytes": loss_bytes}
    return {**out, "runtime_rss_bytes": runtime, "plan": _prediction(spec, adapted, cfg)}


def _per_rank_measurement(spec, adapted, trainer, losses, times, role_bytes, setup_s, load_peak, tok) -> dict:
    """A run under several processes: the peaks of every rank (the largest is the run's), tokens/s of all ranks
    together. The FLOP count, the loss term and the plan are single-process measurements and are left out."""
    out = _measurement(spec, adapted, trainer, losses, times, role_bytes, setup_s, load_peak, tok)
    per_rank = trainer.engine.per_rank(out["peak_bytes"])
    n = trainer.acc.num_processes
    return {
        **out,
        "peak_bytes": max(per_rank),
        "peak_rss_bytes": max(per_rank)
        if out["cuda_peak_allocated_bytes"] is None
        else out["peak_rss_bytes"],
        "peak_bytes_per_rank": per_rank,
        "tokens_per_s": out["tokens_per_s"] * n,
        "processes": n,
        "engine": trainer.engine.name,
        "loss_path": loss_path(trainer),
        "plan": {},
    }


def _prediction(spec: dict, adapted, cfg) -> dict:
    """What `slimtune plan` predicts for this run (traced after the measurement, on fake tensors)."""
    from slimtune.plan.trace import trace_step

    try:
        dtype = next(adapted.model.parameters()).dtype
        t = trace_step(
            adapted.model.config,
            cfg.method,
            spec["batch"],
            spec["seq_len"],
            dtype,
            grad_checkpointing=cfg.train.grad_checkpointing or cfg.train.memory == "low",
            chunked_loss=cfg.train.chunked_loss or cfg.train.memory == "low",
            optimizer_in_backward=cfg.train.optimizer_in_backward,
        )
    except Exception as err:  # the measurement stands; the planner's failure is reported beside it
        return {"error": f"{type(err).__name__}: {err}"}
    return {
        "peak_by_role": t.peak,
        "at_grads": t.at_grads,
        "tensor_peak_bytes": t.total,
        "trainable_bytes": t.trainable_bytes,
        "frozen_bytes": t.frozen_bytes,
        "host_bytes": t.host_bytes,
        "seconds": round(t.seconds, 1),
    }


def step_fields(spec: dict, times: list[float], losses: list[float]) -> dict:
    """The timing and loss fields every measured run reports (slimtune's and a peer's)."""
    median = sorted(times)[len(times) // 2]
    return {
        "step_time_median_s": median,
        "step_times_s": times,
        "tokens_per_s": spec["batch"] * spec["seq_len"] / median,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
    }


def _measurement(spec, adapted, trainer, losses, times, role_bytes, setup_s, load_peak, tok) -> dict:
    cuda = trainer.acc.device.type == "cuda"
    rss = host_peak_bytes()
    cuda_peak = torch.cuda.max_memory_allocated() if cuda else None
    return {
        "trainable_params": sum(p.numel() for p in adapted.trainable_parameters()),
        "total_params": sum(p.numel() for p in adapted.model.parameters()),
        "peak_rss_bytes": rss,
        "load_peak_rss_bytes": load_peak,
        "cuda_peak_allocated_bytes": cuda_peak,
        "cuda_peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "peak_bytes": cuda_peak if cuda else rss,
        "memory_by_role": role_bytes,
        "facts": adapted.bench_facts(spec["seq_len"]),
        **step_fields(spec, times, losses),
        "setup_s": setup_s,
        "device": str(trainer.acc.device),
        **hostmem.report(),  # allocator, huge_pages
        "data": "sentiment text" if tok is not None else "random tokens",
        "traffic": {
            "h2d": dict(adapted.traffic.h2d),
            "d2h": dict(adapted.traffic.d2h),
            **adapted.traffic.totals(),
        },
    }


def main(argv: list[str] | None = None, fn=None) -> int:
    """Run one measurement (``fn``, default: the spec's method or probe) from SPEC.json into OUT.json."""
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        if fn is None:
            fn = run_nf4_forward if spec["method"] == "nf4-forward" else run
        result = {"ok": True, "error": None, **fn(spec)}
    except Exception as err:  # recorded, so the other runs still go on
        result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 reports (it gathered every rank's peak)
        out.write_text(json.dumps(result))
    from slimtune.core.processes import end_job

    code = 0 if result["ok"] else 1
    end_job(code)
    return code


if __name__ == "__main__":
    sys.exit(main())

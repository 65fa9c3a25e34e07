"""High-level entry points used by the CLI: train from a config, reload a finished run, export it."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from slimtune.core import hostmem, memory
from slimtune.core.errors import UserError
from slimtune.core.files import publish_dir, read_json, write_atomic
from slimtune.data.records import load_split
from slimtune.data.tasks import get_task
from slimtune.engines.support import require_supported
from slimtune.methods import PLAIN, make_config, require_trainer
from slimtune.methods import apply as apply_method
from slimtune.methods.base import Adapted
from slimtune.methods.spec import MethodSpec
from slimtune.models import loading as models
from slimtune.training import config as C
from slimtune.training import setup
from slimtune.training.evaluate import EvalResult
from slimtune.training.trainer import Trainer

log = logging.getLogger(__name__)
FINAL = "final"
RUN_CONFIG = "config.yaml"


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def print_eval(title: str, res: EvalResult) -> None:
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in res.metrics.items())
    _say(
        f"{title}: eval loss {res.loss:.4f}, perplexity {res.perplexity:.2f}"
        + (f", {metrics}" if metrics else "")
        + (f" ({res.examples} examples)" if res.examples else "")
    )


def print_samples(before: EvalResult | None, after: EvalResult) -> None:
    for i, s in enumerate(after.samples):
        _say(f"  [{i + 1}] {s['prompt'][:160]!r}")
        _say(f"      reference: {s['reference'][:120]!r}")
        if before is not None and i < len(before.samples):
            _say(f"      before:    {before.samples[i]['output'][:120]!r}")
        _say(f"      after:     {s['output'][:120]!r}")


def new_run_dir(cfg: C.RunConfig) -> Path:
    task = cfg.data.task or Path(cfg.data.path or "data").stem
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.train.output_dir.format(method=cfg.method.name, task=task, time=stamp))
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(
            f"train.output_dir '{run_dir}' already holds files; continue it with "
            f"`slimtune train --resume {run_dir}` or choose another train.output_dir"
        )
    return run_dir


@dataclass
class Prepared:
    adapted: Adapted
    tok: object


def prepare(
    cfg: C.RunConfig, loader: Callable[[], tuple] | None = None, spec: MethodSpec | None = None
) -> Prepared:
    """Set threads, seed, load the model on the default device (or call ``loader`` for (model, tokenizer): the
    bench's random-weight shapes) and apply the method, in that order, so a seed gives the same initialisation
    on every path. `slimtune train`, `eval`, `generate`, `export` and `bench` all start here. ``spec``: the
    method's spec where the job already checked it (:func:`~slimtune.methods.apply`)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    if loader is None:
        model, tok = models.load(cfg.model.name, cfg.model.dtype, device=models.default_device())
    else:
        model, tok = loader()
    adapted = apply_method(model, cfg.method, spec)
    hostmem.release_free_memory()  # what loading and quantizing freed (weight-sized buffers)
    return Prepared(adapted, tok)


def _shared_run_dir(cfg: C.RunConfig, state) -> Path:
    """The new run directory, chosen once by the main process and shared with every rank."""
    chosen: str | None = None
    problem: str | None = None
    if state.is_main_process:
        try:
            chosen = str(new_run_dir(cfg))
        except UserError as err:
            problem = str(err)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        chosen, problem = broadcast_object_list([chosen, problem])
    if problem:
        raise UserError(problem)
    return Path(chosen)


def _param_counts(adapted: Adapted) -> tuple[int, int]:
    """(trainable, total) parameters, counting tensors a method keeps outside the model (MEFT's host store)."""
    n_train = sum(x.numel() for x in adapted.trainable_parameters())
    in_model = {id(x) for x in adapted.model.parameters()}
    n_total = sum(x.numel() for x in adapted.model.parameters()) + sum(
        x.numel() for x in adapted.trainable_parameters() if id(x) not in in_model
    )
    return n_train, n_total


def _eval_before(trainer: Trainer, run_dir: Path, resumed: bool, main: bool) -> EvalResult | None:
    """The evaluation before training (read back when a resumed run already has it; None: ``eval_before``
    is off)."""
    if not trainer.cfg.eval_before:
        return None
    path = run_dir / "eval_before.json"
    if resumed and path.is_file():
        return EvalResult(**read_json(path))
    before = trainer.run_eval()
    if main:
        write_atomic(path, json.dumps(before.__dict__, indent=2))
    return before


def train(cfg: C.RunConfig, resume_dir: Path | None = None) -> dict:
    """Run one training job end to end; print before/after results; return the results dict.

    Under ``accelerate launch`` every rank trains on its shard of each batch; only the main rank writes.
    """
    from accelerate import PartialState

    # the job's checks, each run once and before anything loads: a workflow (PEMA) is refused, and a method x
    # engine pair the launch cannot run; the spec and the engine's name are handed on, not checked again
    spec = require_trainer(cfg.method.name, "train")
    precision = setup.precision(cfg.train.mixed_precision)
    engine = require_supported(cfg.method.name, configured=cfg.train.engine, mixed_precision=precision)
    state = PartialState(cpu=not torch.cuda.is_available())  # MULTI_CPU (gloo) under torchrun on CPUs
    main = state.is_main_process
    say = _say if main else (lambda *_: None)
    t0 = time.perf_counter()
    run_dir = resume_dir if resume_dir is not None else _shared_run_dir(cfg, state)
    task = get_task(cfg.data.task) if cfg.data.task else None
    # before the model exists: what any job in this process carries (with the libraries the method imports)
    runtime = memory.runtime_rss_bytes(spec.needs + cfg.method.needs())
    p = prepare(cfg, spec=spec)
    train_data, eval_data, eval_records, fmt = load_split(cfg.data, p.tok)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        C.save_config(cfg, run_dir / RUN_CONFIG)
    n_train, n_total = _param_counts(p.adapted)
    say(
        f"slimtune: {cfg.method.name} on {cfg.model.name} | {len(train_data)} train / {len(eval_data)} eval "
        f"examples ({fmt}) | trainable {n_train:,} of {n_total:,} params | run dir {run_dir}"
    )
    data = (train_data, eval_data, eval_records, task)
    identity, resume = {"base_model": cfg.model.name}, resume_dir is not None
    trainer = Trainer(
        p.adapted,
        p.tok,
        cfg.train,
        *data,
        run_dir,
        identity=identity,
        resume=resume,
        config=cfg.to_dict(),
        engine=engine,
    )
    try:
        before = _eval_before(trainer, run_dir, resume, main)
        if main and before is not None:
            print_eval("before", before)
        result = trainer.train(resume=resume)
        after = trainer.run_eval()
    finally:
        trainer.close()
    with trainer.whole_model():  # FSDP: every rank gathers, the main one saves
        if not main:
            return {}
        print_eval("after ", after)
        print_samples(before, after)
        facts = {"t0": t0, "runtime_rss_bytes": runtime, "trainable_params": n_train, "total_params": n_total}
        results = _write_results(cfg, p, trainer, result, (before, after), run_dir, facts)
    _say_trained(result, results["saved"], run_dir)
    return results


def _say_trained(result, saved, run_dir: Path) -> None:
    per_rank = result.peak_bytes_per_rank
    _say(
        f"trained {result.steps} steps in {result.train_s:.0f} s ({result.tokens / max(result.train_s, 1e-9):.0f} "
        f"tokens/s), peak memory {memory.fmt_bytes(result.peak_bytes)}"
        + (" per rank: " + ", ".join(memory.fmt_bytes(b) for b in per_rank) if len(per_rank) > 1 else "")
    )
    _say(f"saved: {saved}  (results: {run_dir / 'results.json'}, logs: {run_dir / 'logs'})")


def _write_results(cfg, p: Prepared, trainer: Trainer, result, evals, run_dir: Path, facts: dict) -> dict:
    """Save the trained method to ``<run>/final``; write and return ``<run>/results.json``."""
    before, after = evals
    base = {"base_model": cfg.model.name, "dtype": cfg.model.dtype}
    final = publish_dir(run_dir / FINAL, lambda out: p.adapted.save(out, base))
    mem = p.adapted.memory_report()
    mem["optimizer"] = memory.optimizer_bytes(trainer.optimizer)
    results = {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "task": cfg.data.task,
        "steps": result.steps,
        "before": before.summary() if before is not None else None,
        "after": after.summary(),
        "train_loss_first": result.first_loss,
        "train_loss_last": result.last_loss,
        "train_wall_s": result.train_s,
        "total_wall_s": time.perf_counter() - facts["t0"],
        "tokens": result.tokens,
        "processes": trainer.acc.num_processes,
        "engine": trainer.engine.name,
        "peak_bytes": result.peak_bytes,
        "peak_bytes_per_rank": result.peak_bytes_per_rank,
        "runtime_rss_bytes": facts["runtime_rss_bytes"],
        "host_memory": hostmem.report(),  # the malloc and huge pages the run had (hostmem.py)
        "trainable_params": facts["trainable_params"],
        "total_params": facts["total_params"],
        "memory_by_role": mem,
        "samples": after.samples,
        "saved": str(final),
    }
    write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    return results


def load_run(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[C.RunConfig, Prepared]:
    """Rebuild a finished run: base model + method + the trained state from ``<run>/final``."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG).is_file():
        raise UserError(f"run '{run_dir}': no {RUN_CONFIG} here (not a slimtune run directory)")
    cfg = C.load_config(run_dir / RUN_CONFIG, overrides)
    src = run_dir / FINAL if (run_dir / FINAL).is_dir() else run_dir / "checkpoint" / "method"
    if not src.is_dir():
        raise UserError(f"run '{run_dir}': no trained state (neither final/ nor checkpoint/method/)")
    p = prepare(cfg)
    p.adapted.load(src)
    p.adapted.model.eval()
    return cfg, p


def load_target(run_dir: str | Path | None, model: str | None) -> tuple[C.RunConfig | None, Prepared]:
    """A finished run (``run_dir``) or a bare model (``model``: alias, HF dir, .gguf) with no method applied."""
    if run_dir:
        return load_run(run_dir)
    if not model:
        raise UserError("give a RUN_DIR or --model NAME")
    loaded = models.load(model)
    return None, Prepared(apply_method(loaded[0], make_config(PLAIN)), loaded[1])


def evaluate_target(
    run_dir: str | Path | None,
    model: str | None = None,
    task: str | None = None,
    eval_size: int | str | None = None,
    samples: int = 3,
) -> EvalResult:
    """`slimtune eval`: a run on its own held-out data (or ``task``), or a bare model on ``task``; prints the
    result and ``samples`` generations. ``eval_size`` overrides how many held-out examples are scored ('all':
    the whole held-out set)."""
    from slimtune.training.evaluate import evaluate

    if isinstance(eval_size, int) and eval_size < 1:
        raise UserError(f"--eval-size: {eval_size} must be a positive number of examples")
    size = None if eval_size == "all" else eval_size  # data.eval_size None: every held-out example
    cfg, p = load_target(run_dir, model)
    if task:
        data_cfg = C.DataConfig(task=task, eval_size=200 if eval_size is None else size)
    elif cfg is None:
        raise UserError("eval: give --task with --model")
    else:
        data_cfg = cfg.data if eval_size is None else dataclasses.replace(cfg.data, eval_size=size)
    _, evald, records, _ = load_split(data_cfg, p.tok)
    task_obj = get_task(data_cfg.task) if data_cfg.task else None
    res = evaluate(p.adapted, p.tok, evald, records, task_obj, batch_size=8, num_samples=samples)
    print_eval("eval", res)
    print_samples(None, res)
    return res


def export(run_dir: str | Path, out: str | Path | None = None, fmt: str = "hf", quant: str = "f16") -> Path:
    """Write the run's merged model: a plain HF directory (+ tokenizer) that loads with
    ``AutoModelForCausalLM.from_pretrained`` (``fmt`` hf; default ``<run>/merged``), or one ``.gguf`` file for
    llama.cpp / Ollama / LM Studio (``fmt`` gguf, ``quant`` f16 | bf16 | q8_0 | f32; default
    ``<run>/model-<quant>.gguf``). Nothing existing is overwritten; a method that cannot merge is one line."""
    import shutil
    import tempfile

    from slimtune.models import gguf_export

    run_dir = Path(run_dir)
    if fmt not in ("hf", "gguf"):
        raise UserError(f"--format: {fmt!r} is not one of hf, gguf")
    if fmt == "gguf":
        gguf_export.converter_script()  # before loading anything: is the converter there?
        if quant not in gguf_export.QUANTS:
            raise UserError(f"--quant: {quant!r} is not one of {', '.join(gguf_export.QUANTS)}")
    target = Path(out) if out is not None else run_dir / ("merged" if fmt == "hf" else f"model-{quant}.gguf")
    if fmt == "gguf" and target.is_dir():
        target = target / f"model-{quant}.gguf"
    if target.exists() and (target.is_file() or any(target.iterdir())):
        what = "already exists" if target.is_file() else "is not empty"
        raise UserError(f"export: '{target}' {what}; choose a new --out")
    cfg, p = load_run(run_dir)
    try:
        merged = p.adapted.merge()
    except NotImplementedError as err:
        raise UserError(
            f"export: method '{cfg.method.name}' cannot be merged into a plain model: {err}"
        ) from None
    if fmt == "hf":
        target.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(str(target))
        p.tok.save_pretrained(str(target))
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    hf_dir = Path(tempfile.mkdtemp(prefix=".merged-", dir=target.parent))
    try:
        merged.save_pretrained(str(hf_dir))
        p.tok.save_pretrained(str(hf_dir))
        window = getattr(merged.config, "sliding_window", None)
        if merged.config.model_type == "mistral" and window:
            log.warning(
                "export: llama.cpp's converter writes Mistral as a Llama model without its sliding window "
                "(%d tokens): the GGUF matches the merged model on inputs up to that length",
                window,
            )
        return gguf_export.write_gguf(hf_dir, target, quant)
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)

"""The training loop: one explicit loop on accelerate. It calls the method's callbacks, never its name."""

from __future__ import annotations

import logging
import math
import random
import signal
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from slimtune.core import memory
from slimtune.core.errors import UserError
from slimtune.data.records import BatchStream, Encoded
from slimtune.data.tasks import Task
from slimtune.engines import deepspeed as zero
from slimtune.engines import fsdp as sharding
from slimtune.engines.support import require_supported, zero_stage
from slimtune.methods.base import Adapted
from slimtune.modules import compiling
from slimtune.training import in_backward
from slimtune.training.checkpoint import load_checkpoint, save_checkpoint
from slimtune.training.config import TrainConfig
from slimtune.training.evaluate import EvalResult, evaluate
from slimtune.training.faults import EXIT_NONFINITE, RunStopped, StopSignals
from slimtune.training.optim import make_adamw, make_scheduler
from slimtune.training.setup import apply_memory_settings, check_trainable, loss_function, make_accelerator
from slimtune.training.trackers import RunLog

log = logging.getLogger(__name__)
MAX_SKIPS_IN_ROW = 10  # train.on_nonfinite: skip stops a run that only produces non-finite steps


@dataclass
class TrainResult:
    steps: int
    train_s: float
    tokens: int
    first_loss: float
    last_loss: float
    peak_bytes: int
    peak_bytes_per_rank: list[int] = field(default_factory=list)
    evals: dict[int, dict] = field(default_factory=dict)


class Trainer:
    """Train an :class:`Adapted` on encoded data, evaluating, logging and checkpointing into ``run_dir``."""

    def __init__(
        self,
        adapted: Adapted,
        tok,
        cfg: TrainConfig,
        train: Encoded,
        evald: Encoded,
        eval_records: list[dict],
        task: Task | None,
        run_dir: Path,
        accelerator=None,
        hold_schedules: bool = False,
        identity: dict | None = None,
        resume: bool = False,
        config: dict | None = None,
    ):
        """``hold_schedules``: tell the method the run length is unknown (``total_steps = None``), so
        schedules stay at their first rung (benchmarks time a fixed state, not a schedule). ``identity``
        (``base_model``, ...) is written into each checkpoint's manifest and checked when one is resumed.
        ``resume``: load the newest checkpoint of ``run_dir`` now (required under FSDP, where it is read into
        the whole model before sharding); :meth:`train` with ``resume`` continues from it. ``config``: the
        run's settings, stored with the experiment trackers (``train.report_to``)."""
        self.adapted, self.tok, self.cfg, self.task = adapted, tok, cfg, task
        self.train_data, self.eval_data, self.eval_records = train, evald, eval_records
        self.run_dir = Path(run_dir)
        self.acc = accelerator or make_accelerator(cfg.mixed_precision)
        adapted.total_steps = None if hold_schedules else cfg.steps
        engine = require_supported(
            adapted.cfg.name, configured=cfg.engine, mixed_precision=self.acc.mixed_precision
        )
        self.sharded = engine == "fsdp" and self.acc.num_processes > 1
        self.zero = zero_stage(cfg.zero_stage) if engine == "deepspeed" and self.acc.num_processes > 1 else 0
        self.engine = engine if self.acc.num_processes > 1 else "single"  # (results.json: what ran)
        if self.zero:
            self.engine = f"deepspeed ZeRO-{self.zero}"
        if self.zero and resume:
            raise UserError(
                "--resume under deepspeed: not built (DeepSpeed builds AdamW's state from the tensors it "
                "partitions); the checkpoint is the single-process format: resume it under train.engine=ddp or "
                "fsdp, or in one process"
            )
        check_trainable(adapted)
        apply_memory_settings(adapted, cfg)
        if cfg.compile:
            self._compile()
        self.identity = {"method": adapted.cfg.name, **(identity or {})}
        self._place(resume)
        self.in_backward = self._step_in_backward() if cfg.optimizer_in_backward else None
        # (under ZeRO-3 the head's weight is whole only inside the model's forward: the model's own loss)
        chunked = (cfg.chunked_loss or cfg.memory == "low") and self.zero < 3
        self.loss = loss_function(adapted, self.model, chunked)
        self.stream = BatchStream(
            train, cfg.batch_size, tok.pad_token_id, cfg.seed, self.acc.process_index, self.acc.num_processes
        )
        self.step = 0
        self.skipped = 0  # steps not applied: non-finite loss or gradient (train.on_nonfinite: skip)
        self._skips_in_row = 0
        self.run_log = RunLog(run_dir, cfg.report_to, config, main=self.acc.is_main_process)

    def _compile(self) -> None:
        """``train.compile``: the decoder layers' training forward compiled (one process only, for now)."""
        if self.acc.num_processes > 1:
            raise UserError(
                f"train.compile: not built for a {self.acc.num_processes}-process run yet (one process only); "
                "set train.compile: false"
            )
        why = self.adapted.compile_refusal()
        if why:
            raise UserError(
                f"train.compile: method '{self.adapted.cfg.name}': {why}; set train.compile: false"
            )
        compiling.check_toolchain(self.acc.device)
        n = compiling.compile_layers(self.adapted.model, self.adapted.cfg.name)
        log.info("train.compile: %d decoder layers compile on the first step", n)

    def _step_in_backward(self) -> in_backward.StepInBackward:
        """``train.optimizer_in_backward``: AdamW steps each parameter inside backward (in_backward.py)."""
        why = in_backward.refusal(self.adapted, self.acc.num_processes, getattr(self.acc, "scaler", None))
        if why:
            raise UserError(f"train.optimizer_in_backward: {why}; set train.optimizer_in_backward: false")
        raw = getattr(self.optimizer, "optimizer", self.optimizer)  # (inside accelerate's wrapper)
        return in_backward.StepInBackward(raw, list(self.adapted.named_trainable_parameters()))

    def _place(self, resume: bool) -> None:
        """The model on its device (or sharded), the optimizer and schedule over it, and with ``resume`` the
        newest checkpoint read into the whole model first."""
        adapted, cfg = self.adapted, self.cfg
        if not self.sharded:  # (FSDP moves each rank's shards to its device)
            adapted.model.to(self.acc.device)
        fused = not (self.zero or self.sharded)
        self.optimizer = make_adamw(adapted.param_groups(cfg.weight_decay), cfg.lr, fused)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self._loaded: list[dict | None] = [self._load()] if resume else []
        if self.zero:  # the order of AdamW's tensors and its settings, to save its state as one process would
            self._groups = [list(g["params"]) for g in self.optimizer.param_groups]
            self._hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            config = zero.ds_config(
                cfg.batch_size, cfg.grad_accum, cfg.max_grad_norm, self.zero, self.acc.mixed_precision
            )
            self.model, self.optimizer = zero.wrap(adapted.model, self.optimizer, config)
            return
        if not self.sharded:
            self.model, self.optimizer = self.acc.prepare(adapted.model, self.optimizer)
            return
        # FSDP2 in place, then the optimizer again over the shards, with what it holds
        self.model = sharding.shard(adapted.model, self.acc.mixed_precision)
        whole_opt, whole_sched = self.optimizer.state_dict(), self.scheduler.state_dict()
        self.optimizer = make_adamw(adapted.param_groups(cfg.weight_decay), cfg.lr, fused=False)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.optimizer.load_state_dict(whole_opt)
        self.scheduler.load_state_dict(whole_sched)
        sharding.shard_optimizer_state(self.optimizer)

    # ------------------------------------------------------------ logging
    def _log(self, record: dict) -> None:
        self.run_log.log(record)

    def run_eval(self, with_metric: bool | None = None) -> EvalResult:
        self.adapted.on_eval_start(self.step)
        res = evaluate(
            self.adapted,
            self.tok,
            self.eval_data,
            self.eval_records,
            self.task,
            batch_size=max(self.cfg.batch_size, 8),
            with_metric=self.cfg.eval_metric if with_metric is None else with_metric,
            num_samples=self.cfg.num_generations,
        )
        self._log({"step": self.step, **{f"eval/{k}": v for k, v in res.summary().items()}})
        return res

    # ------------------------------------------------------------ the loop
    def _micro_step(self, batch: dict, last: bool) -> tuple[float, int]:
        batch = {k: v.to(self.acc.device) for k, v in batch.items()}
        if self.zero:  # DeepSpeed divides the loss by grad_accum and reduces at the last micro-batch itself
            self.model.set_gradient_accumulation_boundary(last)
            with self.acc.autocast():
                loss = self.loss(batch)
                self.model.backward(loss)
            return loss.item(), int(batch["attention_mask"].sum())
        if self.sharded:  # FSDP2: reduce-scatter the gradients only after the last micro-batch
            self.model.set_requires_gradient_sync(last)
            sync = nullcontext()
        else:
            sync = nullcontext() if last or self.acc.num_processes == 1 else self.acc.no_sync(self.model)
        with sync, self.acc.autocast():
            loss = self.loss(batch)
            # (stepping inside backward: a non-finite loss must not reach it; the step is skipped as usual)
            if self.in_backward is None or math.isfinite(loss.item()):
                self.acc.backward(loss / self.cfg.grad_accum)
        return loss.item(), int(batch["attention_mask"].sum())

    def train_step(self, with_grads: Callable[[], None] | None = None) -> tuple[float, int, float | None]:
        """One optimizer step over ``grad_accum`` micro-batches, calling the method's callbacks in the order
        :class:`~slimtune.methods.base.Adapted` documents. ``with_grads`` is called once the gradients exist
        (after the method's ``after_backward``, before clipping): benchmarks read memory by role there.
        A non-finite loss or gradient is not applied (``train.on_nonfinite``).

        Returns (mean micro-batch loss, tokens seen, gradient norm before clipping or None).
        """
        cfg, adapted = self.cfg, self.adapted
        data_before = self.stream.state()
        kept = [t.clone() for t in adapted.step_state()]
        adapted.on_step_start(self.step)
        if self.in_backward is not None:
            self.in_backward.start()
        losses, tokens = [], 0
        for micro in range(cfg.grad_accum):
            loss, ntok = self._micro_step(next(self.stream), last=micro == cfg.grad_accum - 1)
            losses.append(loss)
            tokens += ntok
        adapted.after_backward(self.step)
        if with_grads is not None:
            with_grads()
        grad_norm = None
        fault = self._nonfinite(losses)
        if self.in_backward is not None and self.in_backward.fault:
            self._partly_stepped(self.in_backward.fault)
        if fault is None:
            self._skips_in_row = 0
            if self.zero:  # clipping, AdamW and zeroing the gradients, in the engine
                self.model.step()
                norm = self.model.get_global_grad_norm() if cfg.max_grad_norm is not None else None
                grad_norm = None if norm is None else float(norm)
            elif self.in_backward is None:  # (with it, every parameter has stepped inside backward)
                grad_norm = self._clip()
                self.optimizer.step()
            adapted.optimizer_step(self.optimizer)
        else:
            with torch.no_grad():
                for t, k in zip(adapted.step_state(), kept):
                    t.copy_(k)
            self._skip_step(fault, data_before)
        with warnings.catch_warnings():  # a skipped first step: the schedule still advances, as under AMP
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*optimizer.step")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        adapted.on_step_end(self.step)
        loss = sum(losses) / len(losses)
        if self.acc.num_processes > 1:  # report the global batch (mean loss of the ranks, all their tokens)
            both = self.acc.reduce(
                torch.tensor([loss, tokens], dtype=torch.float64, device=self.acc.device), "sum"
            )
            loss, tokens = float(both[0]) / self.acc.num_processes, int(both[1])
        return loss, tokens, grad_norm

    def _clip(self) -> float | None:
        """Clip the gradients to ``train.max_grad_norm``; their global norm before clipping (None: no clipping)."""
        if self.cfg.max_grad_norm is None:
            return None
        params = self.adapted.trainable_parameters()
        if self.sharded:  # torch's clip takes sharded gradients (accelerate's knows only prepared models)
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        else:
            norm = self.acc.clip_grad_norm_(params, self.cfg.max_grad_norm)
        return float(sharding.whole(norm))

    def _nonfinite(self, losses: list[float]) -> str | None:
        """What is non-finite in this step (the loss, or a named gradient), or None; agreed by every rank.
        Under fp16 loss scaling the gradients are left to the scaler: an inf there is its signal to lower the
        scale (it skips that step itself), not a fault."""
        bad = next((f"loss {x}" for x in losses if not math.isfinite(x)), None)
        if bad is None and getattr(self.acc, "scaler", None) is None:
            bad = f"gradient of {name}" if (name := self.adapted.nonfinite_grad()) else None
        if self.acc.num_processes > 1:
            flags = self.acc.reduce(torch.tensor([float(bad is not None)], device=self.acc.device), "sum")
            bad = bad or ("a non-finite loss or gradient on another rank" if float(flags[0]) else None)
        return bad

    def _partly_stepped(self, fault: str) -> None:
        """A non-finite gradient under ``train.optimizer_in_backward``: the parameters before it in backward have
        stepped, so the step cannot be skipped; the run stops without saving that state."""
        saved = self.run_dir / "checkpoint"
        raise RunStopped(
            f"step {self.step + 1}: non-finite {fault}; stopped (train.optimizer_in_backward: "
            f"{self.in_backward.stepped} parameters had already stepped, so the step cannot be skipped; this "
            "state is not saved). "
            + (
                f"Resume the last checkpoint with `slimtune train --resume {self.run_dir}`"
                if saved.exists()
                else "No checkpoint was written before it (train.save_every)"
            )
            + "; lower train.lr or check the data",
            EXIT_NONFINITE,
        )

    def _skip_step(self, fault: str, data_before: dict) -> None:
        """A non-finite step: counted and logged (skip), or the last good state saved and the run stopped."""
        self.skipped += 1
        self._skips_in_row += 1
        what = f"step {self.step + 1}: non-finite {fault}"
        if self.cfg.on_nonfinite == "stop" or self._skips_in_row >= MAX_SKIPS_IN_ROW or self.zero:
            why = "train.on_nonfinite: stop" if self.cfg.on_nonfinite == "stop" else (
                f"{MAX_SKIPS_IN_ROW} non-finite steps in a row" if not self.zero
                else "under deepspeed a step is not skipped: ZeRO holds its reduced gradients until it steps"
            )  # fmt: skip
            self.save_checkpoint(data_state=data_before)
            raise RunStopped(
                f"{what}; stopped ({why}). The state after step {self.step} is saved in "
                f"{self.run_dir / 'checkpoint'}; lower train.lr or check the data, then "
                f"`slimtune train --resume {self.run_dir}`",
                EXIT_NONFINITE,
            )
        log.warning("%s; the step is skipped (%d skipped so far)", what, self.skipped)
        self._log({"step": self.step + 1, "skipped_steps": self.skipped, "nonfinite": fault})

    def whole_model(self):
        """A context in which the adapted model's parameters are whole on every rank (FSDP: gathered from the
        shards; every rank must enter), so the method's state can be saved as one process saves it."""
        if self.zero:
            return zero.full_parameters(self.model, self.zero)
        return sharding.full_parameters(self.model) if self.sharded else nullcontext()

    def _load(self) -> dict | None:
        """Every rank reads the newest checkpoint into the method, optimizer, scheduler and RNGs. The RNG states
        are kept and set again when training resumes (:meth:`_resume`): what runs in between (the loss check,
        the evaluation before training) must not shift them."""
        state = load_checkpoint(self.run_dir, self.adapted, self.optimizer, self.scheduler, self.identity)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._rng = (torch.get_rng_state(), cuda, random.getstate())
        return state

    def _resume(self) -> None:
        if not self._loaded:
            if self.sharded:
                raise ValueError("under FSDP a run resumes by constructing its Trainer with resume=True")
            self._loaded.append(self._load())
        state = self._loaded[0]
        cpu, cuda, py = self._rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        if state is None:
            log.warning("no complete checkpoint in %s yet: the run starts again from step 0", self.run_dir)
            return
        self.step, self.skipped = state["step"], state.get("skipped_steps", 0)
        self.stream.restore(state["data"])
        log.warning("resumed %s at step %d", self.run_dir, self.step)

    def train(self, resume: bool = False) -> TrainResult:
        """Run the remaining steps. SIGINT/SIGTERM: the current step finishes, a checkpoint is saved and
        :class:`RunStopped` is raised (exit 130/143); a second signal exits at once."""
        cfg = self.cfg
        if resume:
            self._resume()
        self.model.train()
        t_start, tokens, first_loss, last_loss = time.perf_counter(), 0, float("nan"), float("nan")
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc="train",
            disable=not self.acc.is_main_process,
            dynamic_ncols=True,
        )
        t_prev = time.perf_counter()
        with StopSignals() as signals:
            while self.step < cfg.steps:
                loss, step_tokens, grad_norm = self.train_step()
                now = time.perf_counter()
                dt, t_prev = now - t_prev, now
                first_loss = loss if math.isnan(first_loss) else first_loss
                last_loss, tokens = loss, tokens + step_tokens
                peak = memory.device_peak_bytes(self.acc.device)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss:.3f}", tok_s=f"{step_tokens / dt:.0f}", mem=memory.fmt_bytes(peak)
                )
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log_step(loss, grad_norm, step_tokens, dt, peak)
                self._periodic(signals)
            bar.close()
            self.save_checkpoint()
        peak = memory.device_peak_bytes(self.acc.device)
        return TrainResult(
            steps=self.step,
            train_s=time.perf_counter() - t_start,
            tokens=tokens,
            first_loss=first_loss,
            last_loss=last_loss,
            peak_bytes=peak,
            peak_bytes_per_rank=self._per_rank(peak),
        )

    def _per_rank(self, value: int) -> list[int]:
        """``value`` of every rank, in rank order (a collective under several processes)."""
        if self.acc.num_processes == 1:
            return [value]
        from accelerate.utils import gather_object

        return [int(v) for v in gather_object([value])]

    def _log_step(self, loss: float, grad_norm: float | None, tokens: int, dt: float, peak: int) -> None:
        self._log(
            {
                "step": self.step,
                "loss": loss,
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / dt,
                "step_time_s": dt,
                "peak_bytes": peak,
                **self.adapted.extra_state_scalars(),
            }
        )

    def _periodic(self, signals: StopSignals) -> None:
        """After a step: evaluation and checkpoint when due, then a stop if a signal arrived (on any rank)."""
        cfg = self.cfg
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
            self.run_eval()
            self.model.train()
        stop = signals.received
        if self.acc.num_processes > 1:
            flag = torch.tensor([float(stop or 0)], device=self.acc.device)
            stop = int(self.acc.reduce(flag, "max")[0]) or None
        if stop and self.step < cfg.steps:
            self.save_checkpoint()
            name = signal.Signals(stop).name
            raise RunStopped(
                f"stopped by {name} after step {self.step} of {cfg.steps}; checkpoint saved in "
                f"{self.run_dir / 'checkpoint'}; continue with `slimtune train --resume {self.run_dir}`",
                StopSignals.exit_code(stop),
            )
        if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
            self.save_checkpoint()

    def save_checkpoint(self, data_state: dict | None = None) -> None:
        """A checkpoint of the current step; ``data_state``: the data position to record (default: now)."""
        self.acc.wait_for_everyone()
        with self.whole_model():
            optimizer_state = sharding.full_optimizer_state(self.optimizer) if self.sharded else None
            if self.zero:
                optimizer_state = zero.full_optimizer_state(self._groups, self._hyper, self.optimizer)
            if self.acc.is_main_process:
                save_checkpoint(
                    self.run_dir,
                    self.adapted,
                    self.optimizer,
                    self.scheduler,
                    {
                        "step": self.step,
                        "data": data_state or self.stream.state(),
                        "skipped_steps": self.skipped,
                    },
                    self.identity,
                    optimizer_state,
                )
        self.acc.wait_for_everyone()  # no rank reads it, or stops, before it is complete

    def close(self) -> None:
        self.run_log.close()

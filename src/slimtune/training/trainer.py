"""The training loop: one explicit loop on accelerate. It calls the method's callbacks (``Adapted``) and the
engine's (``Engine``), never a method's or an engine's name."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from slimtune.core import memory
from slimtune.data.records import BatchStream, Encoded
from slimtune.data.tasks import Task
from slimtune.engines.support import make_engine
from slimtune.methods.base import Adapted
from slimtune.training import setup
from slimtune.training.checkpoint import read_checkpoint, save_checkpoint
from slimtune.training.config import TrainConfig
from slimtune.training.evaluate import EvalResult, evaluate
from slimtune.training.faults import StopSignals, stopped_by
from slimtune.training.nonfinite import NonFiniteSteps
from slimtune.training.optim import make_adamw, make_scheduler
from slimtune.training.trackers import RunLog, StepProgress, TrainResult

log = logging.getLogger(__name__)


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
        engine: str | None = None,
    ):
        """``hold_schedules``: the run length is unknown to the method (``total_steps = None``: schedules hold
        their first rung, as benchmarks need). ``identity`` (``base_model``, ...): written into each checkpoint
        and checked on resume. ``resume``: read ``run_dir``'s newest checkpoint into the whole model before it
        is placed; :meth:`restore` continues from it. ``config``: the run's settings, for the trackers. ``engine``:
        the engine's name where the job already checked the method x engine pair (`slimtune train`)."""
        self.adapted, self.tok, self.cfg, self.task = adapted, tok, cfg, task
        self.train_data, self.eval_data, self.eval_records = train, evald, eval_records
        self.run_dir = Path(run_dir)
        self.identity = {"method": adapted.cfg.name, **(identity or {})}
        # the set-up, in order: accelerator and engine, what trains, memory settings, compilation, placement
        # (after any checkpoint is read), AdamW over the placed parameters, the loss, the data
        self.acc = accelerator or setup.make_accelerator(cfg.mixed_precision)
        self.engine = make_engine(self.acc, adapted.cfg.name, cfg, resume, engine)
        adapted.total_steps = None if hold_schedules else cfg.steps
        setup.check_trainable(adapted)
        setup.apply_memory_settings(adapted, cfg)
        if cfg.compile:
            setup.compile_decoder(adapted, self.acc)
        self._resumed = read_checkpoint(self.run_dir, adapted, self.identity) if resume else False
        self.model, self.optimizer, self.scheduler = self._place()
        in_bwd = cfg.optimizer_in_backward
        self.in_backward = setup.step_in_backward(adapted, self.acc, self.optimizer) if in_bwd else None
        chunked = (cfg.chunked_loss or cfg.memory == "low") and self.engine.loss_outside_forward
        self.loss = setup.loss_function(adapted, self.model, chunked)
        self.stream = BatchStream(
            train, cfg.batch_size, tok.pad_token_id, cfg.seed, self.acc.process_index, self.acc.num_processes
        )
        self.step, self.progress, self._progress_restored = 0, None, None
        self.nonfinite = NonFiniteSteps(cfg.on_nonfinite, self.run_dir, self.engine)
        self.run_log = RunLog(run_dir, cfg.report_to, config, main=self.acc.is_main_process)

    def _place(self):
        """(model, optimizer, schedule): placed by the engine; one AdamW, with a read checkpoint's state."""
        model = self.engine.place_model(self.adapted.model)
        groups = self.adapted.param_groups(self.cfg.weight_decay)
        optimizer = make_adamw(groups, self.cfg.lr, self.engine.fused_adamw)
        scheduler = make_scheduler(optimizer, self.cfg)
        if self._resumed:
            self._resumed.into(optimizer, scheduler)
            self.engine.load_optimizer_state(optimizer)
        model, optimizer = self.engine.prepare_optimizer(model, optimizer)
        return model, optimizer, scheduler

    @property
    def skipped(self) -> int:
        """Steps not applied: non-finite loss or gradient (``train.on_nonfinite: skip``)."""
        return self.nonfinite.skipped

    def run_eval(self, with_metric: bool | None = None) -> EvalResult:
        self.adapted.on_eval_start(self.step)
        metric = self.cfg.eval_metric if with_metric is None else with_metric
        batch, n = max(self.cfg.batch_size, 8), self.cfg.num_generations
        data = (self.eval_data, self.eval_records, self.task)
        res = evaluate(self.adapted, self.tok, *data, batch_size=batch, with_metric=metric, num_samples=n)
        self.run_log.log({"step": self.step, **{f"eval/{k}": v for k, v in res.summary().items()}})
        return res

    def micro_step(self, batch: dict, last: bool) -> tuple[float, int]:
        """Forward and backward of one micro-batch; (its loss, its tokens)."""
        batch = {k: v.to(self.acc.device) for k, v in batch.items()}
        with self.engine.accumulating(self.model, last), self.acc.autocast():
            loss = self.loss(batch)
            # (stepping inside backward: a non-finite loss must not reach it; the step is skipped as usual)
            if self.in_backward is None or math.isfinite(loss.item()):
                self.engine.backward(self.model, loss)
        return loss.item(), int(batch["attention_mask"].sum())

    def train_step(self, with_grads: Callable[[], None] | None = None) -> tuple[float, int, float | None]:
        """One optimizer step over ``grad_accum`` micro-batches, calling the method's callbacks in the order
        :class:`~slimtune.methods.base.Adapted` documents; (mean loss, tokens, gradient norm before clipping or
        None). ``with_grads``: called once the gradients exist, before clipping (the bench reads memory there).
        A non-finite loss or gradient is not applied (``train.on_nonfinite``)."""
        cfg, adapted = self.cfg, self.adapted
        data_before = self.stream.state()
        kept = [t.clone() for t in adapted.step_state()]
        adapted.on_step_start(self.step)
        if self.in_backward is not None:
            self.in_backward.start()
        losses, tokens = [], 0
        for micro in range(cfg.grad_accum):
            loss, ntok = self.micro_step(next(self.stream), last=micro == cfg.grad_accum - 1)
            losses.append(loss)
            tokens += ntok
        adapted.after_backward(self.step)
        if with_grads is not None:
            with_grads()
        grad_norm = None
        fault = self.nonfinite.find(adapted, losses)
        if self.in_backward is not None and self.in_backward.fault:
            self.nonfinite.partly_stepped(self.step, self.in_backward.fault, self.in_backward.stepped)
        if fault is None:
            if self.in_backward is None:  # (with it, every parameter has stepped inside backward)
                grad_norm = self.engine.step(self.model, self.optimizer, adapted.trainable_parameters())
            adapted.optimizer_step(self.optimizer)
        else:
            with torch.no_grad():  # what the forward changed outside the optimizer goes back
                for t, k in zip(adapted.step_state(), kept):
                    t.copy_(k)
            save = lambda: self.save_checkpoint(data_state=data_before)  # noqa: E731
            self.nonfinite.skip(self.step, fault, save, self.run_log.log)
        with warnings.catch_warnings():  # a skipped first step: the schedule still advances, as under AMP
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*optimizer.step")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        adapted.on_step_end(self.step)
        # the global batch: the mean loss of the ranks, all their tokens
        loss, tokens = self.engine.agree([sum(losses) / len(losses), tokens])
        return loss / self.acc.num_processes, int(tokens), grad_norm

    def whole_model(self):
        """A context in which the method's parameters are whole on every rank (a collective where sharded)."""
        return self.engine.whole_model(self.model)

    def restore(self) -> None:
        """Continue from the checkpoint read at construction (``resume=True``): its step, data position,
        skipped count and RNG states (set again: what ran since must not shift them)."""
        if self._resumed is False:
            raise ValueError("a run resumes by constructing its Trainer with resume=True")
        if self._resumed is None:
            log.warning("no complete checkpoint in %s yet: the run starts again from step 0", self.run_dir)
            return
        self._resumed.set_rng()
        state = self._resumed.state
        self.step, self.nonfinite.skipped = state["step"], state.get("skipped_steps", 0)
        self._progress_restored = state.get("progress")  # the totals through that step (older: none)
        self.stream.restore(state["data"])
        log.warning("resumed %s at step %d", self.run_dir, self.step)

    def train(self, resume: bool = False) -> TrainResult:
        """Run the remaining steps. SIGINT/SIGTERM: the current step finishes, a checkpoint is saved and
        :class:`RunStopped` is raised (exit 130/143); a second signal exits at once."""
        if resume:
            self.restore()
        self.model.train()
        main, device = self.acc.is_main_process, self.acc.device
        progress = StepProgress(
            self.run_log, self.cfg.steps, self.step, self.cfg.log_every, main, self._progress_restored
        )
        self.progress, t_prev = progress, time.perf_counter()
        with StopSignals() as signals:
            while self.step < self.cfg.steps:
                loss, tokens, grad_norm = self.train_step()
                now = time.perf_counter()
                dt, t_prev = now - t_prev, now
                extra = {"lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm}
                peak = memory.device_peak_bytes(device)
                progress.step(self.step, loss, tokens, dt, peak, extra, self.adapted.extra_state)
                self._periodic(signals)
            progress.close()
            self.save_checkpoint()
        peak = memory.device_peak_bytes(device)
        return TrainResult(
            steps=self.step,
            train_s=progress.elapsed(),
            tokens=progress.tokens,
            first_loss=progress.first_loss,
            last_loss=progress.last_loss,
            peak_bytes=max(peak, progress.peak),
            peak_bytes_per_rank=self.engine.per_rank(peak),
        )

    def _periodic(self, signals: StopSignals) -> None:
        """After a step: evaluation and checkpoint when due, then a stop if a signal arrived (on any rank)."""
        cfg = self.cfg
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
            self.run_eval()
            self.model.train()
        stop = int(self.engine.agree([float(signals.received or 0)], "max")[0])  # (any rank's signal)
        if stop and self.step < cfg.steps:
            self.save_checkpoint()
            raise stopped_by(stop, self.step, cfg.steps, self.run_dir)
        if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
            self.save_checkpoint()

    def save_checkpoint(self, data_state: dict | None = None) -> None:
        """A checkpoint of the current step; ``data_state``: the data position to record (default: now)."""
        self.acc.wait_for_everyone()
        with self.whole_model():
            optimizer_state = self.engine.optimizer_state(self.optimizer)
            if self.acc.is_main_process:
                state = {"step": self.step, "data": data_state or self.stream.state()}
                state["skipped_steps"] = self.skipped
                state["progress"] = self.progress.state() if self.progress else None
                what = (self.adapted, self.optimizer, self.scheduler, state, self.identity, optimizer_state)
                save_checkpoint(self.run_dir, *what)
        self.acc.wait_for_everyone()  # no rank reads it, or stops, before it is complete

    def close(self) -> None:
        self.run_log.close()

"""Run configuration: YAML -> nested dataclasses, dotted ``key=value`` overrides, all problems reported at once.

The sections (model, data, train) are :class:`~slimtune.core.schema.Checked` dataclasses; ``method`` is the config
class the method registry names. :func:`from_dict` collects the problems of every section before raising one
:class:`~slimtune.core.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimtune.core.errors import ConfigError, UserError
from slimtune.core.schema import Checked, Problem, build, choice, positive


@dataclass
class ModelConfig(Checked):
    name: str = "smollm2-135m"
    """An alias (see `slimtune list`), an HF model directory, or a .gguf file."""
    dtype: str = "auto"
    """Weight/compute dtype: auto (fp32 on CPU, bf16 on CUDA), fp32, bf16, fp16."""

    def check(self) -> list[Problem]:
        return choice("dtype", self.dtype, ("auto", "fp32", "bf16", "fp16"))


@dataclass
class DataConfig(Checked):
    task: str | None = None
    """A built-in task (sentiment, trivia, translate-en-de, arith); gives data and a metric."""
    path: str | None = None
    """Your training data: .jsonl, .csv, .parquet or a saved HF dataset directory (instead of a task)."""
    eval_path: str | None = None
    """Optional held-out data in the same format as `path`."""
    format: str = "auto"
    """text | instruction | chat (OpenAI-style ``messages``) | sharegpt (``conversations`` with ``from``/``value``)
    | auto (guessed from the fields of the first row)."""
    max_length: int = 256
    """Sequences are truncated to this many tokens (a warning counts how many)."""
    packing: bool = False
    """Concatenate examples into full-length rows (text-style training)."""
    train_size: int | None = None
    """Use at most this many training examples (None: all)."""
    eval_size: int | None = 200
    """Evaluate on at most this many held-out examples (None: all)."""
    seed: int = 0
    """Seed of the fixed train/eval split of built-in tasks."""

    def check(self) -> list[Problem]:
        out = choice("format", self.format, ("auto", "text", "instruction", "chat", "sharegpt"))
        out += positive(self, "max_length", "train_size", "eval_size")
        if self.task is None and self.path is None:
            out.append(("task", "give either data.task or data.path"))
        if self.task is not None and self.path is not None:
            out.append(("path", "give data.task or data.path, not both"))
        for key in ("path", "eval_path"):
            value = getattr(self, key)
            if value is not None and not Path(value).exists():
                out.append((key, f"'{value}': no such file or directory" + _hub_hint(value)))
        if self.task is not None:
            from slimtune.data.tasks import TASKS

            if self.task not in TASKS:
                out.append(("task", f"{self.task!r} is not one of {', '.join(sorted(TASKS))}"))
        return out


def _hub_hint(value: str) -> str:
    """What to do when a missing data path looks like a Hugging Face Hub dataset id (``owner/name``)."""
    parts = str(value).split("/")
    if len(parts) != 2 or not all(parts) or Path(value).suffix:
        return ""
    return (
        "; it looks like a Hub dataset id, and slimtune reads only local data (it does not download): where "
        f"you are online, run `datasets.load_dataset('{value}').save_to_disk('DIR')` and set data.path: DIR"
    )


@dataclass
class TrainConfig(Checked):
    steps: int = 60
    """Optimizer steps."""
    batch_size: int = 8
    """Micro-batch size (sequences per forward pass, per process)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warmup steps before the schedule."""
    schedule: str = "cosine"
    """cosine | linear | constant (after warmup)."""
    max_grad_norm: float | None = 1.0
    """Clip gradients to this global norm (None: no clipping)."""
    grad_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    chunked_loss: bool = True
    """Take the training loss through the LM head chunk by chunk, without the [tokens, vocab] logits (exact; used
    where the method and model allow it, see docs/memory.md); evaluation and generation still form logits."""
    memory: str = "standard"
    """standard | low: gradient checkpointing wherever the method keeps backbone activations, with the chunked
    loss; the lowest peak at a measured speed cost (docs/memory.md)."""
    compile: bool = False
    """Compile each decoder layer's training forward with torch.compile (one graph shared by all layers, compiled
    on the first step; evaluation and generation stay eager). Steps 7–9% faster on CPU at a slightly higher peak,
    where the method's layers trace (docs/memory.md, docs/capabilities.md); needs a C++ compiler on CPU, Triton on
    CUDA; one process.
    """
    optimizer_in_backward: bool = False
    """Step AdamW on each parameter as soon as backward has formed its gradient and free the gradient there, so
    the gradients never exist all at once (full fine-tuning's peak drops by about the size of its trainable
    weights; same update as an ordinary step). Needs ``max_grad_norm: null`` and ``grad_accum: 1``; one process;
    not for methods that work on the gradients before the step (SAT, MEFT). See docs/memory.md."""
    mixed_precision: str = "auto"
    """auto (fp32 on CPU, bf16 on CUDA), no, bf16, fp16."""
    engine: str = "auto"
    """How the processes of a multi-process launch share the work: auto (what the launch says: DDP, or FSDP
    under ``accelerate launch --use_fsdp``) | ddp | fsdp (FSDP2: parameters, gradients and optimizer state
    sharded over the processes) | deepspeed (ZeRO, stage ``zero_stage``; docs/distributed.md). One process
    ignores it."""
    zero_stage: int = 2
    """Under ``engine: deepspeed``: 2 (AdamW's state and the gradients partitioned over the processes) or 3 (the
    parameters too)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only before and after training)."""
    eval_before: bool = True
    """Evaluate before training too (the before/after lines; ``results.json`` ``before``). false skips it where
    the base model is scored apart, as `slimtune compare` does once per task."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: only at the end)."""
    log_every: int = 1
    """Log loss, tokens/s and memory every N steps."""
    output_dir: str = "runs/{method}-{task}-{time}"
    """Where results go; {method}, {task} and {time} (YYYYmmdd-HHMMSS) are filled in. Never overwritten."""
    seed: int = 0
    """Seed for initialisation, dropout and data order."""
    num_generations: int = 3
    """How many eval prompts to show generations for, before and after."""
    eval_metric: bool = True
    """Compute the task metric (accuracy, BLEU, ...) at evaluation, not only loss."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard", "jsonl"])
    """Where metrics go: tensorboard, wandb (offline unless WANDB_MODE says otherwise), mlflow (a local file
    store under logs/mlruns unless MLFLOW_TRACKING_URI is set), jsonl. logs/train.jsonl is always written
    (`slimtune report` reads it); wandb and mlflow need `pip install 'slimtune[trackers]'`."""
    on_nonfinite: str = "skip"
    """A NaN/inf loss or gradient: skip (the step is not applied; counted and logged; 10 in a row stop the run
    as with stop) | stop (save the last good state as a checkpoint and exit with code 3)."""

    def check(self) -> list[Problem]:
        out = positive(self, "steps", "batch_size", "grad_accum", "lr", "max_grad_norm", "threads")
        out += positive(
            self,
            "weight_decay",
            "warmup_steps",
            "eval_every",
            "save_every",
            "log_every",
            "num_generations",
            allow_zero=True,
        )
        out += choice("schedule", self.schedule, ("cosine", "linear", "constant"))
        try:
            self.output_dir.format(method="m", task="t", time="0")
        except (KeyError, IndexError, ValueError):
            out.append(
                (
                    "output_dir",
                    f"{self.output_dir!r} may only use the placeholders {{method}}, {{task}}, {{time}}",
                )
            )
        out += choice("mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        out += choice("memory", self.memory, ("standard", "low"))
        out += choice("engine", self.engine, ("auto", "ddp", "fsdp", "deepspeed"))
        out += choice("zero_stage", self.zero_stage, (2, 3))
        if not isinstance(self.report_to, list) or not all(isinstance(x, str) for x in self.report_to):
            out.append(
                ("report_to", f"{self.report_to!r} must be a list of names, e.g. [tensorboard, jsonl]")
            )
        else:
            from slimtune.training.trackers import check

            out += check(self.report_to)
        out += choice("on_nonfinite", self.on_nonfinite, ("skip", "stop"))
        if self.optimizer_in_backward is True and self.max_grad_norm is not None:
            out.append(
                (
                    "optimizer_in_backward",
                    f"needs max_grad_norm: null (it is {self.max_grad_norm}): clipping needs the norm of every "
                    "gradient before any parameter steps",
                )
            )
        if self.optimizer_in_backward is True and self.grad_accum != 1:
            out.append(
                (
                    "optimizer_in_backward",
                    f"needs grad_accum: 1 (it is {self.grad_accum}): each parameter steps as soon as one "
                    "backward has formed its gradient",
                )
            )
        return out


@dataclass
class RunConfig:
    """Everything one `slimtune train` run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(task="sentiment"))
    train: TrainConfig = field(default_factory=TrainConfig)
    method: Any = None  # a MethodConfig subclass chosen by method.name

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["method"] = self.method.to_dict()
        return d


# ---------------------------------------------------------------- YAML + overrides


def parse_overrides(items: list[str]) -> dict:
    """``["train.lr=1e-4", "method.r=8"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected dotted.key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and value.lower() in ("none", "null"):
            value = None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: '{part}' is set twice")
        node[parts[-1]] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    from slimtune.core.files import read_text

    path = Path(path)
    text = read_text(path, "config file ")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise UserError(f"config file '{path}'{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"config file '{path}': the top level must be a mapping (model:, data:, train:, method:)"
        )
    return data


def from_dict(raw: dict) -> RunConfig:
    """Validate a full run config dict; raise one ConfigError naming every problem."""
    from slimtune.methods import METHODS

    problems: list[str] = []
    sections = {"model", "data", "train", "method"}
    for key in raw:
        if key not in sections:
            near = difflib.get_close_matches(str(key), sorted(sections), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (allowed: {', '.join(sorted(sections))})"
            problems.append(f"{key}: unknown section{hint}")
    model = build(ModelConfig, raw.get("model"), "model", problems)
    data = build(DataConfig, raw.get("data", {"task": "sentiment"}), "data", problems)
    train = build(TrainConfig, raw.get("train"), "train", problems)
    method_raw = raw.get("method") or {}
    method = None
    if not isinstance(method_raw, dict):
        problems.append(f"method: expected a mapping with 'name', got {method_raw!r}")
    else:
        name = method_raw.get("name")
        if name is None:
            problems.append(f"method.name: missing (one of {', '.join(METHODS)})")
        elif not isinstance(name, str) or name not in METHODS:
            problems.append(f"method.name: {name!r} is not one of {', '.join(METHODS)}")
        else:
            rest = {k: v for k, v in method_raw.items() if k != "name"}
            method = build(METHODS[name].config_cls, rest, "method", problems)
            problems += _unused_train_keys(METHODS[name], raw.get("train"))
    if problems:
        raise ConfigError(problems)
    return RunConfig(model=model, data=data, train=train, method=method)


def _unused_train_keys(spec, train_raw) -> list[str]:
    """A workflow (PEMA) reads only some ``train.*`` keys; setting another one would be silently ignored."""
    if spec.train_keys is None or not isinstance(train_raw, dict):
        return []
    out = []
    for key in train_raw:
        if key in spec.train_keys:
            continue
        hint = f"; set {spec.instead[key]} instead" if key in spec.instead else ""
        out.append(f"train.{key}: not used by method {spec.name} (a workflow: `{spec.command}`){hint}")
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    raw = read_yaml(path) if path is not None else {}
    if overrides:
        raw = merge(raw, parse_overrides(overrides))
    return from_dict(raw)


def save_config(cfg: RunConfig, path: Path) -> None:
    from slimtune.core.files import write_atomic

    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

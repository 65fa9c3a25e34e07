"""`slimtune` command line: thin subcommands that parse arguments and call the library.

User errors print one line (``slimtune: error: ...``) and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from slimtune.core import hostmem
from slimtune.core.errors import ConfigError, UserError
from slimtune.training.faults import RunStopped


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Unsupported layer type.*")
    logging.basicConfig(level=logging.WARNING, format="slimtune: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional-kernel notices on CPU
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_train(args) -> int:
    from slimtune.recipes import train as api
    from slimtune.training import config as C

    if args.resume:
        run = Path(args.resume)
        if not (run / api.RUN_CONFIG).is_file():
            raise UserError(f"--resume '{run}': no {api.RUN_CONFIG} there (not a slimtune run directory)")
        if args.config:
            args.overrides = [args.config, *args.overrides] if "=" in args.config else args.overrides
        cfg = C.load_config(run / api.RUN_CONFIG, args.overrides)
        api.train(cfg, resume_dir=run)
        return 0
    if not args.config:
        raise UserError("train: give a CONFIG.yaml (or --resume RUN_DIR)")
    cfg = C.load_config(args.config, args.overrides)
    api.train(cfg)  # checks the method and engine once, before the model loads
    return 0


def cmd_validate(args) -> int:
    from slimtune.training import config as C

    cfg = C.load_config(args.config, args.overrides)
    print(
        f"{args.config}: ok (method {cfg.method.name}, model {cfg.model.name}, "
        f"data {cfg.data.task or cfg.data.path}, {cfg.train.steps} steps)"
    )
    return 0


def cmd_list(args) -> int:
    from slimtune.data.tasks import TASKS
    from slimtune.methods import METHODS
    from slimtune.models.loading import ALIASES

    if args.matrix:
        from slimtune.capabilities.render import load_matrix, render

        print(render(load_matrix()), end="")
        return 0
    print("methods (trainer: `slimtune train` / `bench`; workflow: its own command):")
    for spec in METHODS.values():
        how = spec.kind if spec.command is None else f"{spec.kind}: `{spec.command}`"
        print(f"  {spec.name:<8} [{how}] {spec.summary}")
    print("model aliases:")
    for name, alias in ALIASES.items():
        print(f"  {name:<19} {alias.description}\n  {'':<19} install: {alias.install}")
    print("tasks:")
    for t in TASKS.values():
        print(f"  {t.name:<16} {t.description} [{t.metric_name}]")
    return 0


def cmd_eval(args) -> int:
    from slimtune.recipes import train as api

    res = api.evaluate_target(args.run, args.model, args.task, args.eval_size, args.samples)
    if args.json:
        Path(args.json).write_text(json.dumps(res.summary(), indent=2))
    return 0


def cmd_generate(args) -> int:
    from slimtune.recipes import train as api
    from slimtune.training.evaluate import generate

    _, p = api.load_target(args.run, args.model)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    records = [{"instruction": q, "input": ""} for q in prompts]
    for q, out in zip(prompts, generate(p.adapted, p.tok, records, args.max_new_tokens, batch_size=8)):
        print(f"> {q}\n{out}\n")
    return 0


def cmd_export(args) -> int:
    from slimtune.recipes import train as api

    out = api.export(args.run, args.out, args.format, args.quant)
    if args.format == "gguf":
        from slimtune.models.gguf_export import describe

        facts = describe(out)
        print(
            f"exported {out} ({facts['architecture']}, {facts['tensors']} tensors, {'/'.join(facts['types'])}; "
            f"{out.stat().st_size / 1e6:.0f} MB): loads with llama.cpp / Ollama / LM Studio, or "
            f"transformers' AutoModelForCausalLM.from_pretrained(DIR, gguf_file=NAME)"
        )
        return 0
    print(
        f"exported a merged plain model to {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)"
    )
    return 0


def cmd_report(args) -> int:
    from slimtune.recipes.report import report

    path = report(args.runs, args.out)
    print(f"report: {path} (and the curves beside it as PNG)")
    return 0


def cmd_bench(args) -> int:
    from slimtune.bench.run import bench, plan_from_args

    if args.config and "=" in args.config:  # `bench --methods a,b x.k=v`: the first override lands here
        args.overrides, args.config = [args.config, *args.overrides], None
    plan = plan_from_args(
        args.methods,
        args.config,
        args.overrides,
        model=args.model,
        shape=args.shape,
        batch=args.batch,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        timeout_s=args.timeout,
        peers=args.peers,
        procs=args.procs,
    )
    results = bench(plan, args.out)
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {args.out}/results.json, results.md, results.png")
    return 0 if all(r.get("ok") for r in results["runs"]) else 1


def _add_config_commands(sub) -> None:
    t = sub.add_parser("train", help="train from a YAML config (+ dotted key=value overrides)")
    t.add_argument("config", nargs="?", help="CONFIG.yaml")
    t.add_argument("overrides", nargs="*", help="e.g. train.steps=100 method.r=8")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.set_defaults(fn=cmd_train)

    v = sub.add_parser("validate", help="check a config and report every problem at once")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    v.set_defaults(fn=cmd_validate)

    lst = sub.add_parser("list", help="methods, model aliases and tasks")
    lst.add_argument(
        "--matrix", action="store_true", help="what each method does on each model family, dtype and feature"
    )
    lst.set_defaults(fn=cmd_list)


def _add_run_commands(sub) -> None:
    for name, fn, helptext in (
        ("eval", cmd_eval, "evaluate a run (or a base model on a task)"),
        ("generate", cmd_generate, "greedy generations from a run or a base model"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("run", nargs="?", help="RUN_DIR written by `slimtune train`")
        s.add_argument("--model", help="a base model (alias, HF dir, .gguf) instead of a run")
        if name == "eval":
            s.add_argument("--task", help="evaluate on this built-in task instead of the run's data")
            s.add_argument(
                "--eval-size",
                type=_eval_size,
                help="held-out examples to score, or 'all' (default: the run's data.eval_size; 200 with --task)",
            )
            s.add_argument("--samples", type=int, default=3, help="generations to show")
            s.add_argument("--json", help="also write the metrics to this file")
        else:
            s.add_argument("--prompt", action="append", help="a prompt (repeatable); default: lines of stdin")
            s.add_argument("--max-new-tokens", type=int, default=64)
        s.set_defaults(fn=fn)

    e = sub.add_parser("export", help="write a run's merged model: an HF directory or a GGUF file")
    e.add_argument("run", help="RUN_DIR")
    e.add_argument(
        "--out",
        help="new directory (hf) or .gguf file (gguf); default RUN_DIR/merged or RUN_DIR/model-QUANT.gguf",
    )
    e.add_argument("--format", choices=["hf", "gguf"], default="hf", help="hf (default) or gguf")
    e.add_argument(
        "--quant",
        default="f16",
        help="GGUF tensor type: f16 (default), bf16, q8_0, f32 (llama.cpp's converter)",
    )
    e.set_defaults(fn=cmd_export)

    r = sub.add_parser("report", help="curves (PNG) and a Markdown summary of one or more runs, side by side")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR")
    r.add_argument(
        "--out", help="new directory (default RUN_DIR/report for one run, report-TIME for several)"
    )
    r.set_defaults(fn=cmd_report)


def _add_bench_command(sub) -> None:
    b = sub.add_parser("bench", help="measure methods side by side (each run in a fresh process)")
    b.add_argument("config", nargs="?", help="a YAML under benchmarks/ (model, batch, ..., runs: [...])")
    b.add_argument("overrides", nargs="*", help="method settings, e.g. lora.r=64 qlora.backend=torch")
    b.add_argument("--methods", help="comma-separated methods, e.g. full,lora,qlora")
    b.add_argument("--model", help="alias, HF dir or .gguf (default smollm2-135m)")
    b.add_argument("--shape", help="a named architecture with random weights (e.g. llama2-7b), no download")
    b.add_argument("--batch", type=int)
    b.add_argument("--seq-len", type=int)
    b.add_argument("--steps", type=int)
    b.add_argument("--warmup", type=int)
    b.add_argument("--threads", type=int)
    b.add_argument("--timeout", type=int, help="seconds per run (default 1800)")
    b.add_argument(
        "--peers",
        help="also measure what users run instead, on the same rows: 'hf' = transformers.Trainer (+ peft) "
        "for each full / lora / qlora run",
    )
    b.add_argument(
        "--procs",
        type=int,
        help="processes per slimtune run (torchrun; default 1); a run's engine is a setting, e.g. lora.engine=fsdp",
    )
    b.add_argument("--out", required=True, help="new directory for results.json/.md/.png")
    b.set_defaults(fn=cmd_bench)


def cmd_compare(args) -> int:
    from slimtune.recipes.compare import compare

    md, failed = compare(args.spec, args.out)
    print(
        f"slimtune compare: table {md}"
        + (f"; {len(failed)} run(s) failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


def _add_compare_command(sub) -> None:
    c = sub.add_parser(
        "compare",
        help="methods x tasks x seeds as ordinary runs; a table of means +- standard errors (resumable)",
    )
    c.add_argument("spec", help="a YAML: model, tasks, seeds, methods (config files), set (for every run)")
    c.add_argument("--out", help="directory of the comparison (default: the spec's output_dir)")
    c.set_defaults(fn=cmd_compare)


def workflows():
    """Registry entries of the methods that are not one training run, each with the recipe of its command."""
    from slimtune.methods import METHODS, WORKFLOW

    return [s for s in METHODS.values() if s.kind == WORKFLOW]


def _eval_size(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of examples or 'all'") from None


class _Parser(argparse.ArgumentParser):
    """argparse with the house error format: one line, exit 2 (``--help`` still shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"slimtune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="slimtune", description="Frugal fine-tuning of causal LMs.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_config_commands(sub)
    _add_run_commands(sub)
    _add_bench_command(sub)
    _add_compare_command(sub)
    from slimtune.plan.command import add_command as add_plan_command

    add_plan_command(sub)
    for spec in workflows():  # a workflow method's recipe adds its own command
        importlib.import_module(spec.recipe).add_command(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code. A rank of a torchrun / accelerate job ends here (:func:`end_job`)."""
    from slimtune.core.processes import end_job

    code = _command(argv)
    end_job(code)
    return code


def _command(argv: list[str] | None) -> int:
    try:
        # the `slimtune` program itself, not a call from Python: restart on TCMalloc where found
        if argv is None:
            hostmem.use_allocator()
        args = build_parser().parse_args(argv)
        _quiet()
        return args.fn(args)
    except ConfigError as err:
        for problem in err.problems:
            print(f"slimtune: error: {problem}", file=sys.stderr)
        return 2
    except UserError as err:
        print(f"slimtune: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, always
        return 2
    except RunStopped as err:
        print(f"slimtune: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        if err.filename is None:
            raise
        print(f"slimtune: error: '{err.filename}': {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

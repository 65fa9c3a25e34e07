"""`slimtune plan`: its arguments and what it runs (the CLI adds this command)."""

from __future__ import annotations

import json
import sys

from slimtune.core.errors import UserError


def add_command(sub) -> None:
    p = sub.add_parser(
        "plan", help="predict each method's peak memory for a model and GPU (nothing is allocated)"
    )
    p.add_argument("overrides", nargs="*", help="method settings, e.g. lora.r=64 qst.r=8")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="alias, HF dir or .gguf (only its config is read)")
    src.add_argument("--shape", help="a named architecture (e.g. llama2-7b, llama3-8b, llama3-70b)")
    src.add_argument("--config", help="a transformers config.json of any supported architecture")
    p.add_argument("--methods", help="comma-separated trainer methods (default: all)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32 (weights and compute)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument(
        "--optimizer-in-backward",
        action="store_true",
        help="each parameter steps inside backward (train.optimizer_in_backward; needs --grad-accum 1)",
    )
    p.add_argument("--gpu", help="a budget: a size (24GiB, 80GB) or a GPU (a5000, 4090, a100-80, h100, ...)")
    p.add_argument(
        "--fit", default="batch", help="with --gpu: search the largest batch (default), seq_len, or none"
    )
    p.add_argument(
        "--fsdp",
        type=int,
        default=1,
        metavar="N",
        help="per rank of an FSDP2 job of N processes (--batch per rank)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--require", help="exit 1 unless these methods fit the --gpu budget (comma-separated)")
    p.set_defaults(fn=cmd_plan)


def cmd_plan(args) -> int:
    from slimtune import plan as P
    from slimtune.plan.report import render

    runs = P.method_runs(args.methods, args.overrides)
    names = [n for n, _ in runs]
    required = [m.strip() for m in (args.require or "").split(",") if m.strip()]
    if required and not args.gpu:
        raise UserError("--require needs a budget: --gpu SIZE or a GPU name")
    for m in required:
        if m not in names:
            raise UserError(f"--require: '{m}' is not one of the planned methods ({', '.join(names)})")
    config = P.model_config(args.model, args.shape, args.config)
    rows = P.plan(
        config,
        runs,
        args.batch,
        args.seq_len,
        args.dtype,
        args.grad_accum,
        args.grad_checkpointing,
        args.gpu,
        fit=args.fit,
        log=lambda m: print(m, file=sys.stderr),
        fsdp=args.fsdp,
        optimizer_in_backward=args.optimizer_in_backward,
    )
    what = args.shape or args.model or args.config
    if args.json:
        print(
            json.dumps(
                {
                    "model": what,
                    "dtype": args.dtype,
                    "gpu": args.gpu,
                    "fsdp_processes": args.fsdp,
                    "rows": [r.to_json() for r in rows],
                },
                indent=2,
            )
        )
    else:
        budget = f", budget {args.gpu}" if args.gpu else ""
        budget += f", per rank of {args.fsdp} FSDP2 processes" if args.fsdp > 1 else ""
        print(
            render(rows, f"slimtune plan: {what}, {args.dtype}, batch {args.batch} x {args.seq_len}{budget}")
        )
        if args.fsdp > 1:
            print(
                "FSDP2: weights, gradients and optimizer state are this rank's shards; the total also holds the "
                "layers gathered whole at the peak (JSON: buffers)."
            )
    short = [r.method for r in rows if r.method in required and not r.fits]
    if short:
        print(f"slimtune: {', '.join(short)} does not fit {args.gpu}", file=sys.stderr)
        return 1
    return 0

"""Human-readable benchmark reports: a Markdown table and a PNG (memory, tokens/s, loss curves)."""

from __future__ import annotations

from pathlib import Path


def _gb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e9:.2f}"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _run_rows(results: dict) -> list[str]:
    """The main table: one row per run."""
    m = results["meta"]
    lines = [
        f"# slimtune bench — {m['model']}",
        "",
        f"batch {m['batch']} × {m['seq_len']} tokens, {m['steps']} timed steps after {m['warmup']} warm-up, "
        f"{m['device']}, {m['threads']} threads, torch {m['torch']}, transformers {m['transformers']}, "
        f"slimtune {m['slimtune']} ({m['git']}), {m['date']}",
        "",
        "| run | ok | trainable params | peak GB | step s (median) | tokens/s | loss first → last | "
        "baseline | memory ratio | speed ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        ratio = results["ratios"].get(r["label"], {})
        if r.get("ok") and r.get("probe"):
            lines.append(
                f"| {r['label']} (probe: no-grad forward only) | yes | 0 | {_gb(r['peak_bytes'])} | "
                f"{r['step_time_median_s']:.3f} | {r['tokens_per_s']:.0f} | | | | |"
            )
        elif r.get("ok"):
            per_rank = r.get("peak_bytes_per_rank")  # several processes: the largest, then every rank's
            peak = _gb(r["peak_bytes"]) + (f" (ranks {', '.join(map(_gb, per_rank))})" if per_rank else "")
            name = r["label"] + (f", {r['processes']} procs, {r['engine']}" if per_rank else "")
            lines.append(
                f"| {name} | yes | {r['trainable_params']:,} | {peak} | "
                f"{r['step_time_median_s']:.3f} | {r['tokens_per_s']:.0f} | {r['loss_first']:.3f} → "
                f"{r['loss_last']:.3f} | {ratio.get('baseline', '—')} | {_x(ratio.get('memory'))} | "
                f"{_x(ratio.get('speed'))} |"
            )
        else:
            lines.append(f"| {r['label']} | **failed**: {r['error']} | | | | | | | | |")
    return lines + _host_line(results)


def _host_line(results: dict) -> list[str]:
    """Which malloc and whether PyTorch's huge pages each run had (slimtune/core/hostmem.py): they move the CPU peak."""
    groups: dict[str, list[str]] = {}
    for r in results["runs"]:
        if r.get("ok") and "allocator" in r:
            key = f"{r['allocator']} malloc, huge pages {'on' if r.get('huge_pages') else 'off'}"
            groups.setdefault(key, []).append(r["label"])
    if not groups:
        return []
    return [
        "",
        "Host memory: " + "; ".join(f"{', '.join(labels)}: {key}" for key, labels in groups.items()) + ".",
    ]


def _fact_lines(results: dict) -> list[str]:
    """The 4-bit forward ceiling and each run's FLOP-share limit (SAT), next to the measured ratio."""
    lines = []
    c = results.get("ceilings") or {}
    if c:
        lines += [
            "",
            f"Speed ceiling of a forward-only 4-bit backbone: QLoRA step {c['qlora_step_s']:.3f} s / "
            f"NF4 backbone forward {c['nf4_forward_s']:.3f} s = **{c['speed_ceiling']:.2f}×** "
            f"({c['speed_ceiling_with_head']:.2f}× counting the LM head's forward, "
            f"{c['nf4_forward_with_head_s']:.3f} s).",
        ]
    for r in results["runs"]:
        facts, ratio = (r.get("facts") or {}) if r.get("ok") else {}, results["ratios"].get(r["label"], {})
        if "flop_speed_limit" in facts:
            speed = ratio.get("speed")
            measured = (
                f"measured {speed:.2f}× vs {ratio['baseline']} = **{speed / facts['flop_speed_limit']:.0%} of the "
                "limit**"
                if speed
                else "no baseline in this run"
            )
            lines += [
                "",
                f"{r['label']}: omission rate {facts['rate']:g} omits {facts['omitted_mlp']:.1%} of MLP channels "
                f"and {facts['omitted_heads']:.1%} of query heads = {facts['removed_share']:.1%} of the step's "
                f"FLOPs (omittable share {facts['omittable_share']:.1%}); FLOP-share speed limit "
                f"**{facts['flop_speed_limit']:.2f}×**; {measured}.",
            ]
    return lines


def _peer_rows(results: dict) -> list[str]:
    """slimtune against the tools users run instead, measured in the same invocation."""
    peers = results.get("peers") or {}
    if not peers:
        return []
    lines = [
        "",
        "Against the peers (same rows, batch, threads; memory = peer peak / slimtune peak, speed = slimtune "
        "tokens/s / peer tokens/s; above 1× slimtune is ahead):",
        "",
        "| slimtune run | peer | memory | speed |",
        "|---|---|---|---|",
    ]
    for method, p in peers.items():
        lines.append(f"| {method} | {p['peer']} | {_x(p['memory'])} | {_x(p['speed'])} |")
    return lines


def _compute_rows(results: dict) -> list[str]:
    """Each run's FLOPs per step (PyTorch's FlopCounterMode) against the machine's measured matmul rate."""
    runs = [r for r in results["runs"] if r.get("ok") and r.get("compute")]
    if not runs:
        return []
    lines = [
        "",
        "Distance from the compute limit (FLOPs per step from `FlopCounterMode`; limit = FLOPs / the fp32 matmul "
        "rate measured in the same process; share = limit / measured step):",
        "",
        "| run | GFLOP / step | matmul rate GFLOP/s | limit s | step s | share of the limit |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        c = r["compute"]
        lines.append(
            f"| {r['label']} | {c['flops_per_step'] / 1e9:.0f} | {c['matmul_flops_per_s'] / 1e9:.0f} | "
            f"{c['flop_limit_step_s']:.2f} | {r['step_time_median_s']:.2f} | {c['flop_share']:.0%} |"
        )
    return lines


def _role_rows(results: dict) -> list[str]:
    """Memory by role per run (the library's accounting at the last step)."""
    roles = sorted({k for r in results["runs"] if r.get("ok") for k in r.get("memory_by_role", {})})
    if not roles:
        return []
    lines = [
        "",
        "Memory by role (GB, from the library's accounting at the last step; the rest of the peak is "
        "activations, workspace and the runtime):",
        "",
        "| run | " + " | ".join(roles) + " | sum | peak | loss path | loss term (logits / chunked) |",
        "|---|" + "---|" * (len(roles) + 4),
    ]
    for r in results["runs"]:
        if r.get("ok") and r.get("memory_by_role"):
            vals = [r["memory_by_role"].get(k, 0) for k in roles]
            term = r.get("loss_term_bytes")
            term_s = f"{_gb(term['logits'])} / {_gb(term['chunked'])}" if term else "in the method's forward"
            lines.append(
                f"| {r['label']} | "
                + " | ".join(_gb(v) for v in vals)
                + f" | {_gb(sum(vals))} | {_gb(r['peak_bytes'])} | {r.get('loss_path', '—')} | {term_s} |"
            )
    lines += [
        "",
        "Loss term: bytes the training loss holds at its peak beyond the final hidden state, measured on one batch "
        "with MemTracker both ways (the model's [tokens, vocab] logits, their fp32 log-softmax and gradient / "
        "one chunk of the logit-free loss); 'loss path' is the one the run trained with.",
    ]
    return lines


def write_markdown(results: dict, path: Path) -> None:
    from slimtune.plan.report import agreement_lines

    lines = _run_rows(results) + _peer_rows(results) + _compute_rows(results) + _fact_lines(results)
    lines += _role_rows(results)
    lines += agreement_lines(results)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_png(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results["runs"] if r.get("ok") and not r.get("probe")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [r["label"] for r in ok]
    axes[0].bar(names, [r["peak_bytes"] / 1e9 for r in ok], color="tab:blue")
    axes[0].set_title("peak memory (GB)")
    axes[1].bar(names, [r["tokens_per_s"] for r in ok], color="tab:green")
    axes[1].set_title("training tokens/s")
    for r in ok:
        axes[2].plot(range(1, len(r["losses"]) + 1), r["losses"], marker="o", label=r["label"])
    axes[2].set_title("training loss by step")
    axes[2].set_xlabel("step")
    if ok:
        axes[2].legend()
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    m = results["meta"]
    fig.suptitle(f"{m['model']}: batch {m['batch']} × {m['seq_len']}, {m['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

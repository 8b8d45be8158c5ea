"""Rendering benchmark results: rich tables for the terminal, markdown for the README."""
from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table


@dataclass
class Verdict:
    """One benchmark target, checked on a run."""

    target: str
    measured: str
    met: bool


def _fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def print_train_bench(console: Console, report) -> None:
    from pipelines import bench_train as bt

    cfg, results = report.config, report.results
    env = bt.environment(cfg)
    table = Table(title=f"sparta bench train: {cfg.model}, batch {cfg.batch} x {cfg.seq_len}, r = {cfg.rank}, "
                        f"{cfg.dtype}, {env['device_name']} ({env['threads']} threads), "
                        f"median of {cfg.steps} steps after {cfg.warmup} warm-up",
                  caption=f"peak: {env['memory']}. saved: activations autograd keeps for backward "
                          "(weights excluded). over floor: above the floor row; / lora: as a fraction of "
                          "lora's. / PEFT: whole-step ratio to PEFT LoRA.")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c == "row" else "right")
    for r in results:
        table.add_row(*_cells(r))
    console.print(table)
    checks = Table(title="targets, checked on this run")
    for c in ("target", "measured", "met"):
        checks.add_column(c)
    for v in bt.verdicts(results, cfg.rank, report.in_width):
        checks.add_row(v.target, v.measured, "[green]yes[/]" if v.met else "[red]no[/]")
    console.print(checks)
    pairs = bt.sparse_vs_dense(results)
    if pairs:
        console.print("sparse vs parameter-matched dense (paper: up to 10% faster, up to 15% lower peak):")
        for name, t, m in pairs:
            console.print(f"  {name}: step time {t:.3f}x, peak memory {m:.3f}x")


COLUMNS = ["row", "trainable", "step ms", "IQR", "over floor ms", "/ lora", "saved MiB",
           "adapter saved MiB", "/ lora", "peak MiB", "time / PEFT", "peak / PEFT"]


def _cells(r) -> list[str]:
    return [r.name, f"{r.trainable:,}", f"{r.step_ms:.1f}", f"{r.step_ms_iqr:.1f}", f"{r.overhead_ms:+.1f}",
            _fmt(r.overhead_vs_lora), f"{r.saved_mib:.1f}", f"{r.adapter_saved_mib:.2f}",
            _fmt(r.adapter_saved_vs_lora, ".3f"), f"{r.peak_mib:.0f}", _fmt(r.time_vs_peft, ".3f"),
            _fmt(r.peak_vs_peft, ".3f")]


def markdown_train_bench(report) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in report.results]
    return "\n".join(lines)


# -- sparta bench decode ---------------------------------------------------------------------------
DECODE_COLUMNS = ["context", "batch", "row", "tok/s", "ms/step", "attn ms/step", "visited", "passkey",
                  "attn speedup", "tok/s speedup", "seqs != ref", "bound ok"]


def _decode_cells(r) -> list[str]:
    passkey = "-" if r.passkey_correct is None else f"{r.passkey_correct}/{r.passkey_total}"
    return [str(r.context), str(r.batch), r.row, f"{r.tokens_per_s:.1f}", f"{r.step_ms:.1f}",
            f"{r.attention_ms:.2f}", _fmt(r.visited_fraction, ".3f"), passkey,
            _fmt(r.attention_speedup, ".2f") + ("x" if r.attention_speedup is not None else ""),
            _fmt(r.tokens_speedup, ".2f") + ("x" if r.tokens_speedup is not None else ""),
            _fmt(r.seqs_differ, "d"),
            "-" if r.bound_checked is None else f"{r.bound_checked - r.bound_violations}/{r.bound_checked}"]


def decode_title(report) -> str:
    cfg, env = report.config, report.environment
    return (f"sparta bench decode: {cfg.model}, {cfg.dtype}, {env['cpu']} ({env['threads']} threads), "
            f"policy ratio {cfg.policy_ratio}, {cfg.prompts} prompts, {cfg.new_tokens} new tokens, "
            f"{cfg.rounds} round(s)")


def decode_caption(report) -> str:
    from pipelines import bench_decode as bd

    cfg = report.config
    return ("Rows: stock = transformers generate on SDPA with a plain DynamicCache (no ART, no policy); "
            "policy/off = our decode through ART's attention function with ART off; policy/<preset> = ART on. "
            "tok/s = batch / median decode step; ms/step and attn ms/step are medians over every decode step "
            "of all rounds, each round's first step skipped as warm-up (stock: the interval between "
            "generate's logits-processor calls, its own per-step work included). attn ms/step: decode attention "
            "wall time summed over all layers; for stock, transformers' sdpa_attention_forward wrapped with a "
            f"timer, registered through AttentionInterface as '{bd.TIMED_SDPA}' and selected by "
            "config._attn_implementation for that row only. visited: KV blocks visited / candidate blocks "
            "(after the policy). passkey: right answers (decoded text contains the passkey) among the distinct "
            f"prompts of the batch, each counted once: sequences 0..min(batch, {cfg.prompts})-1 (a batch above "
            f"{cfg.prompts} repeats the prompts round-robin). Speedups: vs the same policy's ART-off row of this "
            "run (attention: off ms / on ms; tok/s: on / off). seqs != ref: sequences whose greedy tokens differ "
            "from dense/off (stock row) or from the same policy's ART-off row, up to the reference's first end-of-turn "
            "token (stock generate suppresses it under min_new_tokens, our decode does not). bound ok (certified rows): outputs "
            "(step x layer x sequence x query head) within 2 eps max||v|| of exact fp32 attention, checked in an "
            "extra untimed decode of the same prompts.")


def print_decode_bench(console: Console, report) -> None:
    from pipelines import bench_decode as bd

    table = Table(title=decode_title(report), caption=decode_caption(report))
    for c in DECODE_COLUMNS:
        table.add_column(c, justify="left" if c == "row" else "right")
    results = report.results
    for i, r in enumerate(results):
        last = i + 1 == len(results) or (results[i + 1].context, results[i + 1].batch) != (r.context, r.batch)
        table.add_row(*_decode_cells(r), end_section=last)
    console.print(table)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    checks = Table(title=f"ART targets at {max(report.config.contexts)} tokens, batch >= {bd.TARGET_MIN_BATCH}: "
                         f"attention speedup >= {bd.TARGET_ATTENTION_SPEEDUP}x, tokens/s speedup >= "
                         f"{bd.TARGET_TOKENS_SPEEDUP}x, no passkey lost vs the same policy with ART off")
    for c in ("target", "measured", "met"):
        checks.add_column(c)
    verdicts = bd.verdicts(report)
    for v in verdicts:
        checks.add_row(v.target, v.measured, "[green]yes[/]" if v.met else "[red]no[/]")
    if verdicts:
        console.print(checks)
    else:
        console.print(f"targets: not checked (no batch >= {bd.TARGET_MIN_BATCH} in this run)")


def markdown_decode_bench(report) -> str:
    from pipelines import bench_decode as bd

    lines = [f"**{decode_title(report)}**", "", "| " + " | ".join(DECODE_COLUMNS) + " |",
             "|" + "---|" * len(DECODE_COLUMNS)]
    lines += ["| " + " | ".join(_decode_cells(r)) + " |" for r in report.results]
    lines += ["", decode_caption(report)]
    lines += ["", *(f"Warning: {w}" for w in report.warnings)] if report.warnings else []
    verdicts = bd.verdicts(report)
    if verdicts:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {v.target} | {v.measured} | {'yes' if v.met else 'no'} |" for v in verdicts]
    return "\n".join(lines)


def plot_decode_bench(report, path) -> None:
    """PNG: decode tokens/s (top) and attention ms per step (bottom) vs context, one column per batch
    size, one line per row (policy x ART; stock in black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines import bench_decode as bd

    cfg = report.config
    rows = list(dict.fromkeys(r.row for r in report.results))
    policies = list(cfg.policies)
    arts = [bd.OFF, *(label for label, _ in cfg.art_configs())]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v"]
    by = {(r.context, r.batch, r.row): r for r in report.results}
    n = len(cfg.batches)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n + 2.5, 7.5), squeeze=False, sharex=True)
    for j, batch in enumerate(cfg.batches):
        for row in rows:
            pts = [by[(c, batch, row)] for c in cfg.contexts if (c, batch, row) in by]
            if row == bd.STOCK:
                style = dict(color="black", linestyle="-", marker="x", linewidth=2)
            else:
                policy, art = row.split("/", 1)
                style = dict(color=colors[policies.index(policy) % len(colors)],
                             linestyle=styles[arts.index(art) % len(styles)],
                             marker=markers[arts.index(art) % len(markers)])
            xs = [p.context for p in pts]
            axes[0][j].plot(xs, [p.tokens_per_s for p in pts], label=row, **style)
            axes[1][j].plot(xs, [p.attention_ms for p in pts], label=row, **style)
        axes[0][j].set_title(f"batch {batch}")
        axes[1][j].set_xlabel("context (tokens)")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
            ax.set_xticks(list(cfg.contexts), [str(c) for c in cfg.contexts])
            ax.grid(True, alpha=0.3)
            ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("decode tokens/s")
    axes[1][0].set_ylabel("attention ms / step (all layers)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", title="policy/ART", fontsize=9)
    fig.suptitle(decode_title(report), fontsize=10, wrap=True)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / (4.2 * n + 2.5), 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)

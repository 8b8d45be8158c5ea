"""`sparta bench decode`'s report: the terminal table, its markdown, the plot, the targets checked."""
from __future__ import annotations

import pandas as pd
from rich.console import Console

from pipelines import tables
from pipelines.bench import decode as bd
from pipelines.bench.common import fmt, verdicts_markdown, verdicts_table

DECODE_COLUMNS = ["context", "batch", "row", "tok/s", "ms/step", "attn ms/step", "visited", "passkey",
                  "attn speedup", "tok/s speedup", "attn vs walk", "tok/s vs walk", "seqs != ref", "bound ok"]


def frame(report) -> pd.DataFrame:
    return pd.DataFrame([_decode_cells(r) for r in report.results], columns=DECODE_COLUMNS)


def _decode_cells(r) -> list[str]:
    passkey = "-" if r.passkey_correct is None else f"{r.passkey_correct}/{r.passkey_total}"
    return [str(r.context), str(r.batch), r.row, f"{r.tokens_per_s:.1f}", f"{r.step_ms:.1f}",
            f"{r.attention_ms:.2f}", fmt(r.visited_fraction, ".3f"), passkey,
            fmt(r.attention_speedup, ".2f") + ("x" if r.attention_speedup is not None else ""),
            fmt(r.tokens_speedup, ".2f") + ("x" if r.tokens_speedup is not None else ""),
            fmt(r.attention_vs_walk, ".2f") + ("x" if r.attention_vs_walk is not None else ""),
            fmt(r.tokens_vs_walk, ".2f") + ("x" if r.tokens_vs_walk is not None else ""),
            fmt(r.seqs_differ, "d"),
            "-" if r.bound_checked is None else f"{r.bound_checked - r.bound_violations}/{r.bound_checked}"]


def decode_title(report) -> str:
    cfg, env = report.config, report.environment
    return (f"sparta bench decode: {cfg.model}, {cfg.dtype}, {env['cpu']} ({env['threads']} threads), "
            f"policy ratio {cfg.policy_ratio}, {cfg.prompts} prompts, {cfg.new_tokens} new tokens, "
            f"{cfg.rounds} round(s)")


def decode_caption(report) -> str:
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
            "run (attention: off ms / on ms; tok/s: on / off), and vs its walk row (the ART kernel visiting every block: "
            "ART's own contribution, without the kernel's speed against SDPA). seqs != ref: sequences whose greedy tokens differ "
            "from dense/off (stock row) or from the same policy's ART-off row, up to the reference's first end-of-turn "
            "token (stock generate suppresses it under min_new_tokens, our decode does not). bound ok (certified rows): outputs "
            "(step x layer x sequence x query head) within 2 eps max||v|| of exact fp32 attention, checked in an "
            "extra untimed decode of the same prompts.")


def print_decode_bench(console: Console, report) -> None:
    results = report.results
    ends = [i for i, r in enumerate(results)   # a rule after each context x batch
            if i + 1 == len(results) or (results[i + 1].context, results[i + 1].batch) != (r.context, r.batch)]
    console.print(tables.rich_table(frame(report), decode_title(report), decode_caption(report), left={"row"},
                                    sections=ends))
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    verdicts = bd.verdicts(report)
    if verdicts:
        console.print(verdicts_table(verdicts, f"ART targets at {max(report.config.contexts)} tokens, batch >= "
                                     f"{bd.TARGET_MIN_BATCH}: attention speedup >= {bd.TARGET_ATTENTION_SPEEDUP}x, "
                                     f"tokens/s speedup >= {bd.TARGET_TOKENS_SPEEDUP}x, no passkey lost vs the same "
                                     "policy with ART off (and vs its walk row)"))
    else:
        console.print(f"targets: not checked (no batch >= {bd.TARGET_MIN_BATCH} in this run)")


def markdown_decode_bench(report) -> str:
    lines = [f"**{decode_title(report)}**", "", tables.markdown(frame(report), {"row"}), "", decode_caption(report)]
    lines += ["", *(f"Warning: {w}" for w in report.warnings)] if report.warnings else []
    verdicts = bd.verdicts(report)
    if verdicts:
        lines += ["", verdicts_markdown(verdicts)]
    return "\n".join(lines)


def plot_decode_bench(report, path) -> None:
    """PNG: decode tokens/s (top) and attention ms per step (bottom) vs context, one column per batch
    size, one line per row (policy x ART; stock in black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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

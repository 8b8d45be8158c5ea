"""`sparta bench train`'s report: the terminal table, its markdown, the targets checked on the run."""
from __future__ import annotations

import pandas as pd
from rich.console import Console

from pipelines import tables
from pipelines.bench import train as bt
from pipelines.bench.common import fmt, verdicts_table

COLUMNS = ["row", "trainable", "step ms", "IQR", "over floor ms", "over floor / lora", "saved MiB",
           "adapter saved MiB", "adapter saved / lora", "peak MiB", "time / PEFT", "peak / PEFT"]


def frame(report) -> pd.DataFrame:
    return pd.DataFrame([[r.name, f"{r.trainable:,}", f"{r.step_ms:.1f}", f"{r.step_ms_iqr:.1f}",
                          f"{r.overhead_ms:+.1f}", fmt(r.overhead_vs_lora), f"{r.saved_mib:.1f}",
                          f"{r.adapter_saved_mib:.2f}", fmt(r.adapter_saved_vs_lora, ".3f"), f"{r.peak_mib:.0f}",
                          fmt(r.time_vs_peft, ".3f"), fmt(r.peak_vs_peft, ".3f")] for r in report.results],
                        columns=COLUMNS)


def title(report) -> str:
    cfg = report.config
    env = bt.environment(cfg)
    return (f"sparta bench train: {cfg.model}, batch {cfg.batch} x {cfg.seq_len}, r = {cfg.rank}, {cfg.dtype}, "
            f"{env['device_name']} ({env['threads']} threads), median of {cfg.steps} steps after {cfg.warmup} "
            "warm-up")


def caption(report) -> str:
    return (f"peak: {bt.environment(report.config)['memory']}. saved: activations autograd keeps for backward "
            "(weights excluded). over floor: above the floor row; / lora: as a fraction of lora's. / PEFT: "
            "whole-step ratio to PEFT LoRA.")


def print_train_bench(console: Console, report) -> None:
    console.print(tables.rich_table(frame(report), title(report), caption(report)))
    console.print(verdicts_table(bt.verdicts(report.results, report.config.rank, report.in_width),
                                 "targets, checked on this run"))
    pairs = bt.sparse_vs_dense(report.results)
    if pairs:
        console.print("sparse vs parameter-matched dense (paper: up to 10% faster, up to 15% lower peak):")
        for name, t, m in pairs:
            console.print(f"  {name}: step time {t:.3f}x, peak memory {m:.3f}x")


def markdown_train_bench(report) -> str:
    return tables.markdown(frame(report))

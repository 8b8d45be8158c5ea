"""Rendering benchmark results: rich tables for the terminal, markdown for the README."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


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

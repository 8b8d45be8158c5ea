"""The `sparta` command line."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub is reachable: fail fast instead of hanging
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="sparta: parameter-efficient fine-tuning sweeps and ART-accelerated serving.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
bench_app = typer.Typer(help="Side-by-side benchmarks (one run, interleaved, ratios printed).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _parse_methods(methods: str) -> tuple[str, ...]:
    from adapters import METHODS

    if methods.strip() == "all":
        return tuple(METHODS)
    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise typer.BadParameter(f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
                                 f"valid: all or a comma list of {', '.join(METHODS)}",
                                 param_hint="--methods")
    return names


@bench_app.command("train")
def bench_train(
    model: str = typer.Option("minilm-l6", help="model alias, HF folder or random:<arch>-tiny"),
    methods: str = typer.Option("all", help="'all' or a comma list of adapters.METHODS"),
    steps: int = typer.Option(20, min=1, help="timed steps per row (after warm-up)"),
    warmup: int = typer.Option(3, min=0, help="untimed steps per row first"),
    batch: int = typer.Option(16, min=1),
    seq_len: int = typer.Option(128, min=1),
    rank: int = typer.Option(16, min=1),
    alpha: Optional[float] = typer.Option(None, help="default 2 * rank"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if available)"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads (default: all cores)"),
    peft: bool = typer.Option(True, help="include the HF PEFT LoRA reference rows"),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="default bench-results/train-<model>.csv"),
) -> None:
    """Step time, peak memory and saved activations of every adaptation method vs the floor and PEFT."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from pipelines import bench_train as bt
    from pipelines.reports import markdown_train_bench, print_train_bench

    from workers.assets import check_model_name

    try:
        check_model_name(model)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None
    if dtype not in ("float32", "bfloat16"):
        raise typer.BadParameter("valid: float32, bfloat16", param_hint="--dtype")
    if threads:
        torch.set_num_threads(threads)
    cfg = bt.BenchConfig(model=model, methods=_parse_methods(methods), steps=steps, warmup=warmup,
                         batch=batch, seq_len=seq_len, rank=rank, alpha=alpha, dtype=dtype, peft=peft,
                         **({"device": device} if device else {}))
    console = Console(width=None if sys.stdout.isatty() else 200)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("starting", total=1)
        report = bt.run(cfg, lambda msg, i, n: bar.update(task, description=msg, completed=i, total=n))
    path = csv_path or Path("bench-results") / f"train-{model.replace(':', '_').replace('/', '_')}.csv"
    bt.write_csv(path, report)
    path.with_suffix(".md").write_text(markdown_train_bench(report) + "\n")
    print_train_bench(console, report)
    console.print(f"CSV: {path}  (markdown: {path.with_suffix('.md')}, run metadata: {path.with_suffix('.json')})")


if __name__ == "__main__":
    app()

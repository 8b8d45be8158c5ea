"""The `sparta` command line."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub is reachable: fail fast instead of hanging
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import typer

app = typer.Typer(help="sparta: parameter-efficient fine-tuning sweeps and ART-accelerated serving.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
bench_app = typer.Typer(help="Side-by-side benchmarks (one run, interleaved, ratios printed).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("train")
def bench_train() -> None:
    """Training step time, peak memory and saved activations for every adaptation method."""
    raise NotImplementedError


if __name__ == "__main__":
    app()

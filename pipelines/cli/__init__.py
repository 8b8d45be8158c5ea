"""The `sparta` command line: one module per command group (sweep, serve, eval, bench), the main job
(`sparta run`), the analyses of a sweep (`sparta analyze`) and the MLflow UI (`sparta ui`)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub is reachable: fail fast instead of hanging
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")   # its store notices are not what a user should read

import typer  # noqa: E402

from pipelines.cli import analyze, bench, eval, run, serve, sweep, ui  # noqa: E402

app = typer.Typer(help="sparta: parameter-efficient fine-tuning sweeps and ART-accelerated serving.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
app.add_typer(sweep.app, name="sweep")
app.add_typer(serve.app, name="serve")
app.add_typer(eval.app, name="eval")
app.add_typer(bench.app, name="bench")
app.command("run")(run.command)
app.command("ui")(ui.ui)
app.command("analyze")(analyze.command)

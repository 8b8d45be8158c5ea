"""`sparta ui`: the MLflow UI on the store sparta writes to."""
from __future__ import annotations

import os
import sys
from typing import Optional

import typer


def ui(
    port: int = typer.Option(5000, min=1, max=65535, help="port on 127.0.0.1"),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="backend store (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)"),
) -> None:
    """Browse sweeps, runs and registered adapters: the MLflow UI on http://127.0.0.1:PORT (foreground)."""
    from pipelines.mlflow_store import ui_command

    try:
        argv, env = ui_command(port, tracking_uri)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--tracking-uri") from None
    typer.echo(f"MLflow UI: http://127.0.0.1:{port}  (store {argv[argv.index('--backend-store-uri') + 1]}; "
               "Ctrl+C stops it)")
    sys.stdout.flush()
    # Become the server (same PID): a signal to this process reaches it, and it stops its worker.
    os.execve(argv[0], argv, env)

"""`sparta serve ...`: deploy a model as an OpenAI-style HTTP service on Ray Serve (ART decoding)."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Serve a model over HTTP on Ray Serve: OpenAI-style completions with ART decoding.",
                  no_args_is_help=True)

_STATE = typer.Option(None, "--state", help="where the background deployment is recorded "
                      "(default $SPARTA_CACHE/serve/local.json)")
_ADDRESS = typer.Option(None, "--address", help="a running Ray cluster: HOST:PORT of its GCS, ray://HOST:PORT or "
                        "auto (default: a local Ray on 127.0.0.1)")


def _spec(path: Path, port: Optional[int], scheduler: Optional[str] = None):
    from pipelines.serving.local import load_spec
    from pipelines.serving.spec import ServeSpecError

    try:
        return load_spec(path, port=port, scheduler=scheduler)
    except ServeSpecError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


def _state_path(state: Optional[Path]) -> Path:
    from pipelines.serving.local import default_state_path

    return state or default_state_path()


def _fail(message: str, code: int = 1):
    typer.echo(message, err=True)
    raise typer.Exit(code)


def _interrupt(signum, frame):
    # SIGTERM (from `sparta serve shutdown`) stops like Ctrl-C: through run's finally.
    raise KeyboardInterrupt


@app.command("run")
def run(spec_path: Path = typer.Argument(..., metavar="SPEC.yaml", help="the serve spec"),
        port: Optional[int] = typer.Option(None, help="override the spec's port"),
        scheduler: Optional[str] = typer.Option(None, help="override the spec's scheduler.kind: continuous or static"),
        state: Optional[Path] = _STATE) -> None:
    """Serve in the foreground on a local Ray (127.0.0.1) until Ctrl-C, then stop Serve and Ray."""
    from pipelines.serving import deploy as sv
    from pipelines.serving.local import LocalState, pid_alive, scheduler_kinds
    from pipelines.serving.metrics_run import open_metrics_run
    from pipelines.serving.spec import ServeSpecError

    if scheduler is not None and scheduler not in scheduler_kinds():
        raise typer.BadParameter(f"valid: {', '.join(scheduler_kinds())}; got {scheduler!r}", param_hint="--scheduler")
    spec = _spec(spec_path, port, scheduler)
    old = LocalState.read(_state_path(state))
    if old is not None and old.pid != os.getpid() and pid_alive(old.pid):
        _fail(f"a local deployment is running already: {old.name} at {old.url} (pid {old.pid}); "
              "`sparta serve shutdown` first, or give another --state")
    metrics = None
    try:
        resolved = sv.resolve_model(spec)
        sv.check_port_free(spec.host, spec.port)
        metrics = open_metrics_run(spec, resolved)   # before the replicas: they log to it
        url = sv.deploy(spec, sv.build_app(spec, resolved, metrics))
    except BaseException as e:
        if metrics is not None:
            metrics.end("FAILED")
        if isinstance(e, ServeSpecError):
            _fail(str(e), 2)
        raise
    import ray
    from ray import serve

    signal.signal(signal.SIGTERM, _interrupt)
    path = _state_path(state)   # so that `status` and `shutdown` find this process too
    try:
        LocalState(os.getpid(), url, spec.served_name, ray.get_runtime_context().gcs_address,
                      str(spec_path.resolve()), os.environ.get("SPARTA_SERVE_LOG", ""),
                      os.environ.get("RAY_AUTH_MODE", "")).write(path)
        typer.echo(f"serving {spec.served_name} at {url}  (OpenAI API: {url}/v1; Ctrl-C stops)")
        if spec.dtype == "auto":
            from workers.hardware import resolve_device, why

            typer.echo(f"dtype auto: {why(resolve_device(spec.device))}")
        if metrics is not None:
            typer.echo(f"replica metrics every {spec.metrics_interval_s:g} s to MLflow run {metrics.run_id} "
                       f"(experiment {spec.metrics_experiment}, {metrics.tracking_uri})")
        sys.stdout.flush()
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        typer.echo("stopping ...")
    finally:
        serve.shutdown()   # replicas make their last report here
        ray.shutdown()
        if metrics is not None:
            metrics.end("FINISHED")
        if (st := LocalState.read(path)) is not None and st.pid == os.getpid():
            path.unlink(missing_ok=True)
        typer.echo("stopped")


@app.command("deploy")
def deploy(spec_path: Path = typer.Argument(..., metavar="SPEC.yaml", help="the serve spec"),
           address: Optional[str] = _ADDRESS,
           port: Optional[int] = typer.Option(None, help="override the spec's port"),
           timeout: float = typer.Option(600.0, help="seconds to wait for the replicas"),
           state: Optional[Path] = _STATE) -> None:
    """Deploy and return: on a cluster (--address) the app lives there; otherwise a background
    `sparta serve run` keeps a local Ray (see `status` and `shutdown`). Prints the URL."""
    from pipelines.serving import deploy as sv
    from pipelines.serving.local import Background, DeploymentError, LocalState, pid_alive
    from pipelines.serving.spec import ServeSpecError

    spec = _spec(spec_path, port)
    if address:
        try:
            url = sv.deploy(spec, address=address)
        except (ServeSpecError, ValueError) as e:
            _fail(str(e), 2)
        typer.echo(url)
        return
    path = _state_path(state)
    old = LocalState.read(path)
    if old is not None and pid_alive(old.pid):
        _fail(f"a local deployment is running already: {old.name} at {old.url} (pid {old.pid}); "
              "`sparta serve shutdown` first")
    try:   # fail here, not in the background: the spec's model and the port
        sv.resolve_model(spec)
        sv.check_port_free(spec.host, spec.port)
    except ServeSpecError as e:
        _fail(str(e), 2)
    log = path.with_suffix(".log")
    try:
        bg = Background.start(spec_path, path, log, port, timeout)
    except DeploymentError as e:
        _fail(str(e))
    typer.echo(bg.url)
    typer.echo(f"  {bg.state.name}: pid {bg.state.pid}, log {log}; `sparta serve status`, `sparta serve shutdown`",
               err=True)


def _connect(address: Optional[str], state: Optional[Path]):
    from pipelines.ray_local import start_ray
    from pipelines.serving.local import LocalState, pid_alive

    if address:
        start_ray(address)
        return None
    st = LocalState.read(_state_path(state))
    if st is None or not pid_alive(st.pid):
        _fail(f"no local deployment is running (no live one recorded in {_state_path(state)}); "
              "give --address for a cluster")
    if st.auth_mode:   # its token is in ~/.ray/auth_token; say so, as Ray only looks when told
        os.environ["RAY_AUTH_MODE"] = st.auth_mode
    start_ray(st.gcs_address)
    return st


@app.command("status")
def status(address: Optional[str] = _ADDRESS, state: Optional[Path] = _STATE,
           as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Applications, deployments and replica states (and the endpoint's health for a local deployment)."""
    from pipelines.http import EndpointError, request_json
    from pipelines.serving import deploy as sv

    st = _connect(address, state)
    rows = sv.status_rows()
    health = None
    if st is not None:
        try:
            health = request_json(st.url + "/healthz", timeout=5)
        except EndpointError as e:
            health = {"status": f"unreachable: {e}"}
    if as_json:
        typer.echo(json.dumps({"local": None if st is None else vars(st), "health": health, "applications": rows},
                              indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if st is not None:
        console.print(f"local deployment {st.name} at {st.url} (pid {st.pid}): {health.get('status')}")
    table = Table("application", "status", "deployment", "replicas")
    for r in rows:
        table.add_row(r["application"], r["status"], r["deployment"],
                      ", ".join(f"{k} {v}" for k, v in r["replicas"].items()) or "-")
    console.print(table if rows else "no Serve applications")


@app.command("shutdown")
def shutdown(address: Optional[str] = _ADDRESS, name: Optional[str] = typer.Option(
                 None, help="delete only this application (with --address); default: all of Serve"),
             state: Optional[Path] = _STATE,
             timeout: float = typer.Option(60.0, help="seconds to wait for the local deployment to stop")) -> None:
    """Stop the local background deployment (its Serve and Ray), or Serve applications on a cluster."""
    from pipelines.serving.local import LocalState, pid_alive, stop_pid

    if address:
        from ray import serve

        from pipelines.ray_local import start_ray
        from pipelines.serving.metrics_run import end_metrics_runs

        start_ray(address)
        if name:
            serve.delete(name)
        else:
            serve.shutdown()
        typer.echo(f"deleted {name}" if name else "Serve shut down")
        try:   # the deployment runs `deploy --address` left running (default store and experiment)
            ended = end_metrics_runs(name)
        except Exception as e:
            typer.echo(f"could not end the deployment's MLflow run: {e}", err=True)
        else:
            if ended:
                typer.echo(f"ended MLflow run(s) {', '.join(ended)}")
        return
    path = _state_path(state)
    st = LocalState.read(path)
    if st is None or not pid_alive(st.pid):
        path.unlink(missing_ok=True)
        _fail(f"no local deployment is running (nothing live recorded in {path})")
    # The process we started: it stops Serve and Ray itself.
    if not stop_pid(st.pid, timeout):
        _fail(f"pid {st.pid} did not stop within {timeout:.0f} s")
    path.unlink(missing_ok=True)
    typer.echo(f"stopped {st.name} ({st.url})")

"""`sparta sweep ...`: run a sweep locally or on a Ray cluster, follow it, resume it, read its table."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Fine-tuning sweeps: Ray Tune x Ray Train x DeepSpeed, tracked in MLflow.",
                  no_args_is_help=True)

ADDRESS = typer.Option(None, "--address", help="a Ray cluster's dashboard, e.g. http://HEAD:8265 (default: run here)")
TRACKING = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlruns/mlflow.db)")


def _load(spec_path: Path):
    from pipelines.sweeps.spec import SpecError, load_spec

    try:
        return load_spec(spec_path)
    except SpecError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
    except FileNotFoundError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None


@app.command("run")
def run(spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="the sweep's YAML spec"),
        address: Optional[str] = ADDRESS, tracking_uri: Optional[str] = TRACKING,
        storage: Optional[Path] = typer.Option(None, help="where Tune keeps state and checkpoints (default ./sweeps)")) -> None:
    """Run a sweep: here (starts Ray locally), or as a Ray Job on the cluster at --address."""
    parsed = _load(spec)   # a bad spec fails here, before Ray starts
    if address:
        from pipelines.sweeps import jobs

        job = jobs.submit(spec, address, tracking_uri, storage or Path("sweeps"))
        typer.echo(f"submitted sweep {parsed.experiment!r} as Ray Job {job}\n"
                   f"follow it: sparta sweep logs {job} --address {address} --follow  |  "
                   f"sparta sweep status {job} --address {address} [--wait]")
        return
    _run_here(parsed, spec, tracking_uri, storage, resume=False)


@app.command("resume")
def resume(experiment: str = typer.Argument(..., help="the experiment name of an interrupted sweep"),
           address: Optional[str] = ADDRESS, tracking_uri: Optional[str] = TRACKING,
           storage: Optional[Path] = typer.Option(None, help="where the sweep keeps its state (default ./sweeps)")) -> None:
    """Continue an interrupted sweep (Tune restore): finished trials are kept, the rest run, each from its
    last checkpoint. With --address, as a Ray Job on the cluster (--storage: the folder its nodes share)."""
    import json

    from pipelines.sweeps.driver import STATE_FILE, sweep_storage

    if address:   # the state lies on the cluster's storage: the job's driver reads it there
        from pipelines.sweeps import jobs

        job = jobs.submit_resume(experiment, address, storage or Path("sweeps"), tracking_uri)
        typer.echo(f"submitted the resume of sweep {experiment!r} as Ray Job {job}\n"
                   f"follow it: sparta sweep logs {job} --address {address} --follow  |  "
                   f"sparta sweep status {job} --address {address} [--wait]")
        return
    state_file = sweep_storage(experiment, storage) / STATE_FILE
    if not state_file.exists():
        typer.secho(f"no sweep {experiment!r} to resume under {state_file.parent}", fg="red", err=True)
        raise typer.Exit(2)
    state = json.loads(state_file.read_text())
    parsed = _load(Path(state["spec"]))
    _run_here(parsed, Path(state["spec"]), tracking_uri or state["tracking_uri"], storage, resume=True)


# Ray Tune's states of a trial that has not ended: the sweep was interrupted before it ran or finished.
UNENDED = ("PENDING", "RUNNING", "PAUSED")


def _run_here(parsed, spec_path: Path, tracking_uri, storage, resume: bool) -> None:
    from pipelines.progress import SweepProgress, console as make_console
    from pipelines.sweeps.driver import run_sweep
    from pipelines.sweeps.summary import render

    console = make_console(160)
    if parsed.train.precision == "auto":
        from workers.hardware import resolve_device, why

        console.print(f"train.precision auto: {why(resolve_device())} (each worker decides for its own device; "
                      "the trial's MLflow run is tagged sparta.precision)")
    progress = SweepProgress(parsed.n_trials, console)
    with progress.live:
        outcome = run_sweep(parsed, spec_path, tracking_uri=tracking_uri, storage_root=storage, resume=resume,
                            on_progress=progress)
    console.print()
    console.print(render(outcome.summary, "table"))
    if outcome.pareto is not None and len(outcome.pareto):
        from pipelines import tables

        names = ", ".join(f"{o.metric} ({o.mode})" for o in parsed.objectives)
        console.print(tables.rich_table(outcome.pareto, f"Pareto front over {names}: "
                                        f"{int(outcome.pareto['pareto'].sum())} of {len(outcome.pareto)} trials",
                                        left={"trial_key", "method"}))
    for reg in outcome.registered:
        alias = f"now {reg.champion_uri}" if reg.champion else \
            f"{reg.champion_uri} stays version {reg.previous_champion}"
        console.print(f"registered {reg.uri} ({reg.method}, {reg.trial_key}); {alias}", markup=False)
    total = parsed.n_trials
    ended = sum(r.status not in UNENDED for r in outcome.records.values())
    if ended < total:   # Ctrl-C: Tune saved its state (trials not started have no record); the run ended KILLED
        console.print(f"[yellow]sweep {outcome.experiment!r} interrupted after {outcome.wall_s:.0f} s with "
                      f"{total - ended} of {total} trials not finished; "
                      f"`sparta sweep resume {outcome.experiment}` runs them (finished trials are kept).[/]")
        raise typer.Exit(130)
    from pipelines.sweeps.tracking import driver_peak_rss_mib

    console.print(f"sweep {outcome.experiment!r} done in {outcome.wall_s:.0f} s ({len(outcome.records)} trials, "
                  f"{len(outcome.records) / max(outcome.wall_s / 60, 1e-9):.1f} per minute; driver peak RSS "
                  f"{driver_peak_rss_mib():.0f} MiB). Browse it in MLflow: [bold]sparta ui[/] then http://127.0.0.1:5000")
    failed = [r for r in outcome.records.values() if r.status != "FINISHED"]
    if failed:
        console.print(f"[red]{len(failed)} of {len(outcome.records)} trials did not finish:[/]")
        for rec in failed:
            console.print(f"  {rec.params['trial_key']}: {rec.status}: {rec.error or '-'}", markup=False)
        raise typer.Exit(1)


@app.command("status")
def status(job_id: str, address: str = typer.Option(..., "--address"),
           wait: bool = typer.Option(False, "--wait", help="wait until the job ends; exit 1 unless it SUCCEEDED")) -> None:
    """The state of a sweep submitted as a Ray Job (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from pipelines.sweeps import jobs

    state = jobs.wait(job_id, address) if wait else jobs.status(job_id, address)
    typer.echo(state)
    if wait and state != "SUCCEEDED":
        raise typer.Exit(1)


@app.command("logs")
def logs(job_id: str, address: str = typer.Option(..., "--address"),
         follow: bool = typer.Option(False, "--follow", "-f", help="stream the output until the job ends")) -> None:
    """The driver's output of a sweep submitted as a Ray Job."""
    from pipelines.sweeps import jobs

    if follow:
        for chunk in jobs.follow_logs(job_id, address):
            typer.echo(chunk, nl=False)
    else:
        typer.echo(jobs.logs(job_id, address))


@app.command("stop")
def stop(job_id: str, address: str = typer.Option(..., "--address")) -> None:
    """Stop a sweep submitted as a Ray Job."""
    from pipelines.sweeps import jobs

    typer.echo("stopped" if jobs.stop(job_id, address) else "not running")


@app.command("results")
def results(experiment: str, fmt: str = typer.Option("table", "--format", help="table, csv or markdown"),
            tracking_uri: Optional[str] = TRACKING) -> None:
    """The comparison table of a sweep (mean +- std over seeds per model x dataset x method), and which
    registered version holds the `champion` alias of each model the sweep registered."""
    from pipelines.sweeps.summary import render
    from pipelines.sweeps.tracking import latest_sweep_run_id, results_table, sweep_champions

    if fmt not in ("table", "csv", "markdown"):
        raise typer.BadParameter("valid: table, csv, markdown", param_hint="--format")
    try:
        parent = latest_sweep_run_id(experiment, tracking_uri)   # one sweep for the table and the champions
        df = results_table(experiment, tracking_uri, parent)
        champions = sweep_champions(experiment, tracking_uri, parent)
    except ValueError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(render(df, fmt))
    if fmt != "csv":   # CSV stays one table for the programs that read it
        for mv in champions:
            typer.echo(_champion_line(mv, parent))


def _champion_line(mv, parent_run_id: str) -> str:
    """models:/NAME@champion -> version N (method, trial, val metric; this sweep or another)."""
    from pipelines.sweeps.registry import champion_uri

    tags = mv.tags
    metric = tags.get("metric", "metric")
    origin = "this sweep" if mv.run_id == parent_run_id else f"sweep run {mv.run_id}"
    return (f"{champion_uri(mv.name)} -> version {mv.version} ({tags.get('method', '?')}, "
            f"{tags.get('trial_key', '?')}, val {metric} {tags.get(f'val_{metric}', '?')}; {origin})")

"""`sparta run` (what `make run` runs): the whole pipeline on the embedded default, in one process.

1. the sweep of `--sweep` (local Ray, tracked in MLflow); the best adapter gets registered;
2. that registered model served by Ray Serve on 127.0.0.1, decoding with the serve spec's ART setting;
3. a needle-in-a-haystack probe through the endpoint, ART off and on, on the same prompts (an MLflow run);
   then the same for the winner's base model (the winner learnt to answer with a bare sentiment label);
4. a final summary: the sweep table, NIAH accuracy with and without ART, tokens/s, skipped KV.
Serve and Ray are shut down at the end, whatever happens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from typing import Optional

import typer

from pipelines import PROJECT_ROOT

ROOT = PROJECT_ROOT
SWEEP = ROOT / "examples" / "sweep-run.yaml"
SERVE = ROOT / "examples" / "serve-run.yaml"


@dataclass
class Probe:
    """The NIAH probe's settings (see `sparta eval niah`)."""

    lengths: tuple[int, ...] = (1024,)         # small on purpose: `sparta eval niah` is the full grid
    depths: tuple[float, ...] = (0.5,)
    variants: tuple[str, ...] = ("single", "multikey")
    art: tuple[str, ...] = ("off", "on")   # "on": the served spec's own ART setting


def run(console, sweep_spec: Path = SWEEP, serve_spec: Path = SERVE, tracking_uri: str | None = None,
        storage: Path | None = None, probe: Probe = Probe(), out: Path = Path("eval-results/run")) -> dict:
    import ray
    from ray import serve

    from pipelines.evaluation import niah as ev
    from pipelines.http import wait_healthy
    from pipelines.mlflow_store import resolve_tracking_uri
    from pipelines.progress import SweepProgress
    from pipelines.serving import deploy as sv
    from pipelines.serving.metrics_run import open_metrics_run
    from pipelines.serving.spec import load_serve_spec
    from pipelines.sweeps.driver import run_sweep
    from pipelines.sweeps.spec import load_spec
    from pipelines.sweeps.summary import render
    from workers.hardware import resolve_device, why

    t0 = time.perf_counter()
    tracking_uri = resolve_tracking_uri(tracking_uri)
    sweep = load_spec(sweep_spec)             # both specs are checked before anything starts
    template = load_serve_spec(serve_spec)
    sv.check_port_free(template.host, template.port)
    timings, metrics_runs = {}, []
    try:
        console.rule(f"1/3 sweep {sweep.experiment!r}: {sweep.n_trials} trials")
        console.print(f"dtype auto here: {why(resolve_device())} (training precision and serving dtype)")
        progress = SweepProgress(sweep.n_trials, console)
        with progress.live:
            outcome = run_sweep(sweep, sweep_spec, tracking_uri=tracking_uri, storage_root=storage,
                                on_progress=progress)
        timings["sweep_s"] = time.perf_counter() - t0
        console.print()   # off the live line (a file or pipe gets its last state without a line end)
        console.print(render(outcome.summary, "table"))
        failed = [r for r in outcome.records.values() if r.status != "FINISHED"]
        if failed or not outcome.registered:
            raise RuntimeError(f"{len(failed)} trial(s) failed and {len(outcome.registered)} model(s) registered: "
                               "nothing to serve")
        registered = outcome.registered[0]

        # The winner answers sentiment labels now; its base model shows what ART does to retrieval itself.
        probes = []
        for step, model in (("2/3", registered.uri), ("3/3", registered.model)):
            spec = load_serve_spec(serve_spec, model=model, tracking_uri=tracking_uri)
            console.rule(f"{step} serving {model} with ART {spec.art} on {spec.url}; NIAH through it, ART off and on")
            t1 = time.perf_counter()
            with console.status("resolving the model and starting the replica"):
                resolved = sv.resolve_model(spec)
                run = open_metrics_run(spec, resolved)   # the replica reports to it periodically
                metrics_runs.append(run)
                url = sv.deploy(spec, sv.build_app(spec, resolved, run), check_port=not probes)
                wait_healthy(url, 300, spec.resolved_api_key())
            report, niah_run = _probe(console, url, spec, registered.model, probe, tracking_uri, out / spec.served_name)
            serve.delete(spec.served_name)
            timings[f"serve+niah {spec.served_name}_s"] = time.perf_counter() - t1
            probes.append((model, spec.art, report, niah_run))
    finally:
        if ray.is_initialized():
            try:
                serve.shutdown()   # the replica makes its last metrics report
            finally:
                ray.shutdown()
        for run in metrics_runs:
            if run is not None:
                run.end()

    console.rule("summary")
    console.print(render(outcome.summary, "table"))
    console.print(f"best adapter registered: {registered.uri} ({registered.method})")
    for model, art, report, _ in probes:
        console.print(f"\n[bold]{model}[/] served with ART {art!r} (on) vs off:")
        ev.print_report(console, report)
    timings["total_s"] = time.perf_counter() - t0
    console.print("time: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items()))
    console.print(f"MLflow ({tracking_uri}): experiment {sweep.experiment!r} (sweep, a child run per trial, summary), "
                  f"the registry ({registered.uri}), experiment {ev.EXPERIMENT!r} (one NIAH run per served model: "
                  f"grid, heatmaps, answers), experiment 'sparta-serve' (each deployment's replica metrics).\n"
                  "Browse it: [bold]sparta ui[/] (or make ui), then http://127.0.0.1:5000")
    return {"sweep": outcome, "registered": registered, "probes": probes, "timings": timings}


def _probe(console, url: str, spec, tokenizer: str, probe: Probe, tracking_uri: str, out: Path):
    """NIAH through the endpoint, ART off and the deployment's own ART, same prompts; logged to MLflow."""
    from pipelines.evaluation import niah as ev
    from pipelines.progress import bar

    cfg = ev.NiahConfig(endpoint=url, tokenizer=tokenizer, lengths=probe.lengths, depths=probe.depths,
                        variants=probe.variants, art=probe.art, api_key=spec.resolved_api_key(),
                        tracking_uri=tracking_uri)
    with bar(console, "prompts", "building prompts") as update:
        report = ev.run(cfg, update)
    return report, ev.log_mlflow(report, out, run_name=f"niah-{spec.served_name}")


def command(
    sweep: Path = typer.Option(Path("examples/sweep-run.yaml"), exists=True, dir_okay=False, help="the sweep spec"),
    serve: Path = typer.Option(Path("examples/serve-run.yaml"), exists=True, dir_okay=False,
                               help="how the registered winner is served (its model is replaced by the winner)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="default: sqlite:///mlruns/mlflow.db"),
    storage: Optional[Path] = typer.Option(None, help="where Tune keeps state and checkpoints (default ./sweeps)"),
) -> None:
    """The whole pipeline here: sweep -> best adapter registered -> served with ART on 127.0.0.1 -> NIAH
    probe through the endpoint (ART off vs on) -> summary. What `make run` runs."""
    from pipelines.progress import console
    from pipelines.sweeps.spec import SpecError

    try:
        run(console(160), sweep, serve, tracking_uri, storage)
    except SpecError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None

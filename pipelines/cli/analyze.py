"""`sparta analyze EXPERIMENT|RUN_ID`: the Beyond-LoRA analyses of a finished sweep's trials, on their stored
adapters, and the report over them (pipelines.analysis.run)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipelines.cli.options import names


def command(
    target: str = typer.Argument(..., help="an MLflow experiment (its newest sweep) or a sweep's parent run id"),
    analyses: str = typer.Option("gap,bounds,spectrum,intruders,landscape",
                                 help="comma list of: gap, bounds, spectrum, intruders, landscape"),
    examples: int = typer.Option(64, min=1, help="fixed training and test examples for the gap and the landscape"),
    landscape_points: Optional[int] = typer.Option(
        None, min=3, help="points of the 1-D landscape slice on [-1, 1], odd (default: the spec's analysis_settings)"),
    landscape_points_2d: Optional[int] = typer.Option(
        None, min=3, help="points per axis of the 2-D landscape slice, odd (default: the spec's analysis_settings)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri",
                                               help="MLflow tracking URI (default: sqlite:///mlruns/mlflow.db)"),
    out: Path = typer.Option(Path("analysis-results"), help="folder for report.md, its PNGs and trials.csv"),
) -> None:
    """Analyze every finished trial of a sweep (metrics and files logged to its run), then write the report
    (accuracy and gap tables, bound order vs measured gap, intruder curves, landscapes) to the sweep's run."""
    from pipelines.analysis.run import AnalyzeConfig, run
    from pipelines.progress import bar, console as make_console
    from workers.training.analysis import AnalysisSettings, check_analyses

    try:
        chosen = check_analyses(names(analyses))
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--analyses") from None
    if not chosen:
        raise typer.BadParameter("name at least one analysis", param_hint="--analyses")
    for name, points in (("landscape_points", landscape_points), ("landscape_points_2d", landscape_points_2d)):
        try:   # the workers' own rule (odd, >= 3), checked before anything downloads
            AnalysisSettings.from_dict({} if points is None else {name: points})
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--" + name.replace("_", "-")) from None
    cfg = AnalyzeConfig(target=target, analyses=chosen, examples=examples, tracking_uri=tracking_uri,
                        landscape_points=landscape_points, landscape_points_2d=landscape_points_2d)
    console = make_console()
    try:
        with bar(console) as update:
            result = run(cfg, out, update)
    except ValueError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
    console.print(result["markdown"], markup=False, highlight=False)   # "![name](file)" is not rich markup
    console.print(f"{result['trials']} trials analyzed; report in {out} and in run {result['parent_run_id']}'s "
                  f"artifacts (analysis-report/)")

"""`sparta analyze EXPERIMENT|RUN_ID`: the Beyond-LoRA analyses of a finished sweep, on its stored adapters.

For every finished trial of the sweep (the experiment's newest, or the parent run given by id): download its
adapter from MLflow, rebuild its model and data from the sweep's logged spec, run the analyses
(`workers.training.analysis.analyze`) and log their metrics and files to the trial's own run. What is not
rerun is read from what the trial logged itself (a sweep with `analysis:`), so `--analyses bounds` after
such a sweep only adds the report. Then the report
over all trials (pipelines.analysis.report: accuracy and 𝒢 tables, bound order vs measured 𝒢, intruder curves,
landscape panels) goes to the parent run as markdown + PNG artifacts under "analysis-report", and to `out`.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from adapters.analysis import EPS_GRID
from pipelines.analysis import report
from pipelines.mlflow_store import ROLE_TAG, now_ms, resolve_tracking_uri
from pipelines.sweeps.registry import ADAPTER_ARTIFACT, ANALYSIS_ARTIFACT
from pipelines.sweeps.spec import load_spec
from pipelines.sweeps.tracking import FINAL_PREFIX, latest_sweep_run_id, load_trials

REPORT_ARTIFACT = "analysis-report"
LANDSCAPE_LINE = "landscape-merged-1d.csv"   # the report's landscape panels: each trial's 1-D merged slice
DEFAULT_ANALYSES = ("gap", "bounds", "spectrum", "intruders", "landscape")


@dataclass(frozen=True)
class AnalyzeConfig:
    target: str                                  # an experiment name, or a sweep's parent run id
    analyses: tuple[str, ...] = DEFAULT_ANALYSES
    examples: int = 64                           # the fixed train and test examples of gap and landscape
    tracking_uri: str | None = None
    landscape_points: int | None = None          # None: the sweep spec's analysis_settings
    landscape_points_2d: int | None = None


def sweep_of(client: MlflowClient, target: str, tracking_uri: str) -> tuple[str, str]:
    """(experiment name, parent run id) for an experiment name (its newest sweep) or a sweep's run id."""
    experiment = client.get_experiment_by_name(target)
    if experiment is not None:
        return target, latest_sweep_run_id(target, tracking_uri)
    try:
        run = client.get_run(target)
    except MlflowException:
        raise ValueError(f"{target!r} is neither an MLflow experiment nor a run id in {tracking_uri}") from None
    if run.data.tags.get(ROLE_TAG) != "sweep":
        raise ValueError(f"run {target} is not a sweep's parent run (its role is "
                         f"{run.data.tags.get(ROLE_TAG, 'unset')!r}); give the sweep's run id or experiment")
    return client.get_experiment(run.info.experiment_id).name, target


def analyze_trial(client: MlflowClient, spec, trial: dict, cfg: AnalyzeConfig, scratch: Path) -> dict[str, float]:
    """Download one trial's adapter, run the analyses, log metrics (as "final/analysis/...") and files
    ("analysis/") to its run. Returns the metrics."""
    import torch

    from workers.data.datasets import load_task
    from workers.data.tables import load_table_task
    from workers.training.analysis import AnalysisSettings, analyze
    from workers.training.loop import TrainConfig, build_model, fixed_loss, resolve_framing
    from workers.hardware import resolve_device, resolve_precision

    run_id = trial["run_id"]
    adapter = Path(client.download_artifacts(run_id, ADAPTER_ARTIFACT, str(scratch)))
    known = {f.name for f in fields(TrainConfig)}
    train_cfg = TrainConfig(**{k: v for k, v in spec.trial_config(trial["params"]).items() if k in known})
    precision = resolve_precision(train_cfg.precision, resolve_device())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    task = (load_table_task(train_cfg.dataset, seed=train_cfg.split_seed) if isinstance(train_cfg.dataset, dict)
            else load_task(train_cfg.dataset, seed=train_cfg.split_seed))
    framing = resolve_framing(train_cfg)
    _, frame = build_model(train_cfg, task, framing, dtype)   # the framing's tokenizer; the model is dropped
    sets = {"train": task.train[:cfg.examples], "test": task.test[:cfg.examples]}
    batch = train_cfg.eval_batch_size or train_cfg.batch_size
    out = scratch / "analysis"
    settings = spec.analysis_settings.model_dump()
    settings.update({k: v for k in ("landscape_points", "landscape_points_2d") if (v := getattr(cfg, k)) is not None})
    metrics = analyze(adapter, lambda: build_model(train_cfg, task, framing, dtype)[0], cfg.analyses,
                      n_train=len(task.train), out=out,
                      losses=lambda m, split: fixed_loss(m, frame, sets[split], batch),
                      settings=AnalysisSettings.from_dict(settings))
    stamp = now_ms()
    client.log_batch(run_id, metrics=[Metric(FINAL_PREFIX + k, v, stamp, 0) for k, v in metrics.items()
                                      if math.isfinite(v)])
    if any(out.iterdir()):
        client.log_artifacts(run_id, str(out), ANALYSIS_ARTIFACT)
    return metrics


def trials_frame(trials: list[dict]) -> tuple[pd.DataFrame, str]:
    """One row per finished trial for the report, and the sweep's main metric ("val_<metric>")."""
    metrics = {t["final"].get("metric") for t in trials} - {None}
    metric = f"val_{sorted(metrics)[0]}" if metrics else "val_accuracy"
    rows = []
    for t in trials:
        p, f = t["params"], t["final"]
        row = {"model": p.get("model"), "dataset": p.get("dataset"), "method": p.get("method"), "seed": p.get("seed"),
               "lr": float(p["lr"]) if p.get("lr") is not None else math.nan,
               metric: f.get(metric), "test_" + metric[4:]: f.get("test_" + metric[4:]),
               "gap": f.get("analysis/gap", f.get("gap")), "bound_term": f.get("analysis/bound_term")}
        row.update({f"intruders_eps{e:g}": f.get(f"analysis/intruders_eps{e:g}") for e in EPS_GRID})
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.astype({c: "float64" for c in df.columns if c not in ("model", "dataset", "method", "seed")}), metric


def logged_file(client: MlflowClient, run_id: str, artifact: str, into: Path) -> Path | None:
    """A run's logged artifact file, downloaded into `into`, or None where the run has none."""
    folder, _, name = artifact.rpartition("/")
    if name not in {Path(f.path).name for f in client.list_artifacts(run_id, folder)}:
        return None
    into.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, artifact, str(into)))


def plot_landscapes(curves: dict[tuple[str, str, str], list[pd.DataFrame]], path: Path) -> Path:
    """One panel per (model, dataset): the 1-D training-loss slice around each method's merged weights (mean over
    seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({(m, d) for m, d, _ in curves})
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 3.8), squeeze=False)
    colors = report.method_colors({method for _, _, method in curves})
    order = list(colors)   # the canonical method order
    for ax, (model, dataset) in zip(axes[0], pairs):
        for (m, d, method), frames in sorted(curves.items(), key=lambda kv: order.index(kv[0][2])):
            if (m, d) == (model, dataset):
                mean = pd.concat(frames).groupby("alpha", as_index=False)["loss"].mean()
                ax.plot(mean["alpha"], mean["loss"], label=method, color=colors[method])
        ax.set(title=f"{model} / {dataset}", xlabel="alpha (filter-normalised direction)", ylabel="training loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(cfg: AnalyzeConfig, out: Path, progress: Callable[[str, int, int], None] = lambda *a: None) -> dict:
    """Analyze every finished trial of the sweep, then write and log the report. Returns {"markdown", "files",
    "parent_run_id", "trials"}."""
    uri = resolve_tracking_uri(cfg.tracking_uri)
    client = MlflowClient(uri)
    experiment, parent = sweep_of(client, cfg.target, uri)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sparta-analyze-") as tmp:
        spec_dir = Path(client.download_artifacts(parent, "spec", tmp))
        resolved = spec_dir / "spec.resolved.yaml"
        spec = load_spec(resolved if resolved.exists() else next(spec_dir.glob("*.y*ml")))
        trials = [t for t in load_trials(experiment, uri, parent) if t["status"] == "FINISHED"]
        if not trials:
            raise ValueError(f"sweep run {parent} of {experiment!r} has no finished trials to analyze")
        curves: dict[tuple[str, str, str], list[pd.DataFrame]] = {}
        for i, trial in enumerate(trials):
            key = trial["params"].get("trial_key", trial["run_id"])
            progress(f"analyzing {key}", i, len(trials))
            scratch = Path(tmp) / f"trial-{i}"
            trial["final"].update(analyze_trial(client, spec, trial, cfg, scratch))
            line = scratch / "analysis" / LANDSCAPE_LINE
            if not line.exists():   # not rerun: the one the trial itself logged, if it ran the landscape
                line = logged_file(client, trial["run_id"], f"{ANALYSIS_ARTIFACT}/{LANDSCAPE_LINE}", scratch / "logged")
            if line is not None and line.exists():
                p = trial["params"]
                curves.setdefault((p["model"], p["dataset"], p["method"]), []).append(pd.read_csv(line))
        progress("writing the report", len(trials), len(trials))
        frame, metric = trials_frame(trials)
        figures = {}
        agreements = [a for a in report.bound_vs_gap(frame) if not a.table.empty]
        if agreements and frame["bound_term"].notna().any() and frame["gap"].notna().any():
            figures["bound vs gap"] = "bound-vs-gap.png"
            report.plot_bound_vs_gap(agreements, out / figures["bound vs gap"])
        intruders = report.intruder_curves(frame)
        if not intruders.empty:
            figures["intruder curves"] = "intruders.png"
            report.plot_intruder_curves(intruders, out / figures["intruder curves"])
        if curves:
            figures["landscapes"] = "landscapes.png"
            plot_landscapes(curves, out / figures["landscapes"])
        markdown = report.markdown(frame, metric, figures)
        (out / "report.md").write_text(markdown + "\n")
        frame.to_csv(out / "trials.csv", index=False)
        client.log_artifacts(parent, str(out), REPORT_ARTIFACT)
    return {"markdown": markdown, "files": sorted(p.name for p in out.iterdir()), "parent_run_id": parent,
            "trials": len(trials)}

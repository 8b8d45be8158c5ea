"""MLflow for sweeps, on the driver only: a parent run per sweep, a child run per trial (params, metrics
per eval step, the adapter folder), the summary table as artifacts, and the best adapter per model x
dataset in the Model Registry as a pyfunc model. Workers never import this; they report through Ray.

    tracker = SweepTracker(experiment="sparta")          # sqlite:///mlruns/mlflow.db by default
    with tracker:                                         # the parent run ends FAILED on an exception
        tracker.start("sweep.yaml", spec_dict)
        for trial in finished_trials:                     # plain dicts, no Ray types
            tracker.log_trial(trial.params, trial.history, trial.final, trial.adapter_dir)
        result = tracker.finish()                         # summary, totals, registry, parent run ends
    sweep_table = results_table("sweep-tiny")            # rebuilt from the child runs
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipelines.mlflow_store import (DEFAULT_EXPERIMENT, ROLE_TAG, decode_param, ensure_experiment, git_tags,
                                    log_metrics, log_params, now_ms, number, plain, resolve_tracking_uri,
                                    search_all, sparta_version)
from pipelines.sweeps import summary as summ
from pipelines.sweeps.pareto import pareto_table, write_pareto
from pipelines.sweeps.registry import (ADAPTER_ARTIFACT, ANALYSIS_ARTIFACT, RegisteredAdapter, current_champion,
                                     register_best)
from workers.training.trial import NODE_KEY

log = logging.getLogger(__name__)

METRIC_TAG = "sparta.metric"            # the trial's main metric name, e.g. "accuracy"
FINAL_PREFIX = "final/"                 # final metrics of a trial: "final/test_accuracy"
SUMMARY_ARTIFACT = "summary"
# Ray Tune's trial states, accepted as trial statuses besides MLflow's own.
_STATUS = {"FINISHED": "FINISHED", "FAILED": "FAILED", "KILLED": "KILLED",
           "TERMINATED": "FINISHED", "ERROR": "FAILED"}


def _status(status: str) -> str:
    try:
        return _STATUS[str(status).upper()]
    except KeyError:
        raise ValueError(f"unknown trial status {status!r}; valid: {', '.join(_STATUS)}") from None


# -- the sweep -------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    parent_run_id: str
    summary: Any                                     # pandas.DataFrame, as summary.summary_table
    registered: list[RegisteredAdapter] = field(default_factory=list)
    pareto: Any = None                               # pandas.DataFrame, as pareto.pareto_table (objectives only)


class SweepTracker:
    """Records one sweep in MLflow (see the module docstring). All calls take plain Python data.

    Use it as a context manager: if the block raises, the parent run is ended FAILED (KILLED on
    Ctrl+C); if it ends normally without `finish`, `finish` runs then. Every child run is ended in a
    `finally`, whatever happens while it is being written.
    """

    def __init__(self, experiment: str = DEFAULT_EXPERIMENT, tracking_uri: str | None = None, *,
                 register: bool = True, registry_prefix: str = "sparta"):
        self.experiment = experiment
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.register = register
        self.registry_prefix = registry_prefix
        self.client = MlflowClient(self.tracking_uri)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.trials: list[dict] = []
        self._t0 = 0.0
        self._open = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "SweepTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._open:
            if exc_type is None:
                self.finish()
            else:
                self._end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED",
                          error=f"{exc_type.__name__}: {exc}")
        return False

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeError("no sweep run is open: call start() first (finish() ends it)")

    def _end(self, status: str, error: str | None = None) -> None:
        self._open = False
        try:
            if error:
                self.client.set_tag(self.parent_run_id, "sparta.error", error[:5000])
        finally:
            self.client.set_terminated(self.parent_run_id, status)

    def start(self, spec_path: str | os.PathLike | None = None, spec_dict: dict | None = None, *,
              run_name: str | None = None, tags: dict[str, str] | None = None) -> str:
        """Open the sweep's parent run: spec file (and the resolved spec) as artifacts under "spec",
        the spec's scalars as params, git commit and sparta version as tags. Returns the run id."""
        if self._open:
            raise RuntimeError("this tracker already has an open sweep run")
        self.experiment_id = ensure_experiment(self.tracking_uri, self.experiment)
        spec_path = Path(spec_path) if spec_path is not None else None
        run_tags = {ROLE_TAG: "sweep", "sparta.version": sparta_version(), **git_tags()}
        if spec_path is not None:
            run_tags["sparta.spec"] = spec_path.name
        run_tags.update(tags or {})
        name = run_name or (f"sweep-{spec_path.stem}" if spec_path is not None else None)
        run = self.client.create_run(self.experiment_id, tags=run_tags, run_name=name)
        self.parent_run_id = run.info.run_id
        self._open, self._t0 = True, time.time()
        try:
            if spec_dict:
                log_params(self.client, self.parent_run_id, spec_dict)
            with tempfile.TemporaryDirectory() as tmp:
                if spec_path is not None:
                    self.client.log_artifact(self.parent_run_id, str(spec_path), "spec")
                if spec_dict is not None:
                    import yaml

                    resolved = Path(tmp) / "spec.resolved.yaml"
                    resolved.write_text(yaml.safe_dump(json.loads(json.dumps(spec_dict, default=str)),
                                                       sort_keys=False))
                    self.client.log_artifact(self.parent_run_id, str(resolved), "spec")
        except BaseException as e:
            self._end("FAILED", error=f"{type(e).__name__}: {e}")
            raise
        return self.parent_run_id

    def reopen(self, parent_run_id: str) -> str:
        """Continue an interrupted sweep's parent run (`sparta sweep resume`): mark it running again and
        take the trials already logged under it, so that `finish` summarises all of them."""
        if self._open:
            raise RuntimeError("this tracker already has an open sweep run")
        run = self.client.get_run(parent_run_id)
        self.experiment_id, self.parent_run_id = run.info.experiment_id, parent_run_id
        exp = self.client.get_experiment(self.experiment_id)
        self.trials = [t for t in load_trials(exp.name, self.tracking_uri, parent_run_id)
                       if t["status"] == "FINISHED"]
        self.client.update_run(parent_run_id, status="RUNNING")
        self._open, self._t0 = True, time.time()
        return parent_run_id

    # -- trials ------------------------------------------------------------------------------------
    def log_trial(self, params: dict, history: list[dict], final: dict,
                  adapter_dir: str | os.PathLike | None = None, status: str = "FINISHED", *,
                  error: str | None = None) -> str:
        """One child run under the sweep: every param, every metric of every eval at its step, the final
        metrics (as "final/<name>"), tags, the adapter folder under "adapter" and, beside it in the checkpoint,
        the analyses' files under "analysis". Returns its run id.

        `status` is FINISHED, FAILED or KILLED (Ray's TERMINATED / ERROR are read as the first two).
        """
        self._require_open()
        status = _status(status)
        params = {k: plain(v) for k, v in dict(params).items()}
        history = [dict(h) for h in (history or [])]
        final = dict(final or {})
        trial = {"params": params, "history": history, "final": final, "status": status}
        metric = summ.metric_name(trial)
        key = str(params.get("trial_key") or "-".join(
            str(params.get(k, "?")) for k in ("model", "dataset", "method", "seed")))
        params.setdefault("trial_key", key)

        end = now_ms()
        wall = number(final.get("wall_s"))
        start = end - int(wall * 1000) if wall is not None and math.isfinite(wall) and wall >= 0 else end
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, MLFLOW_RUN_NAME: key, ROLE_TAG: "trial",
                "trial_key": key, **{k: str(params[k]) for k in ("method", "model", "dataset", "seed")
                                     if k in params}}
        if metric:
            tags[METRIC_TAG] = metric
        if error:
            tags["sparta.error"] = str(error)[:5000]
        if isinstance(final.get(NODE_KEY), str):   # the Ray node its rank-0 worker ran on
            tags["sparta.ray_node_id"] = final[NODE_KEY]
        if isinstance(final.get("precision"), str):   # what train.precision (auto by default) came to there
            tags["sparta.precision"] = final["precision"]
        run = self.client.create_run(self.experiment_id, start_time=start, tags=tags, run_name=key)
        run_id = run.info.run_id
        ok = False
        try:
            log_params(self.client, run_id, params)
            self._log_metrics(run_id, history, final, start, end)
            if adapter_dir is not None:
                if Path(adapter_dir).is_dir():
                    self.client.log_artifacts(run_id, str(adapter_dir), ADAPTER_ARTIFACT)
                    analysis = Path(adapter_dir).parent / ANALYSIS_ARTIFACT   # the trial's analyses, if it ran any
                    if analysis.is_dir():
                        self.client.log_artifacts(run_id, str(analysis), ANALYSIS_ARTIFACT)
                else:
                    log.warning("trial %s: adapter folder %s does not exist; not logged", key, adapter_dir)
                    self.client.set_tag(run_id, "sparta.adapter_missing", str(adapter_dir))
            ok = True
        finally:
            self.client.set_terminated(run_id, status if ok else "FAILED", end_time=end if ok else None)
        trial.update(run_id=run_id, adapter_dir=str(adapter_dir) if adapter_dir is not None else None)
        self.trials.append(trial)
        return run_id

    def _log_metrics(self, run_id: str, history: list[dict], final: dict, start: int, end: int) -> None:
        metrics: list[Metric] = []
        last_step = 0
        for i, ev in enumerate(history):
            x = number(ev.get("step"))
            step = int(x) if x is not None else i
            last_step = max(last_step, step)
            wall = number(ev.get("wall_s"))
            ts = start + int(wall * 1000) if wall is not None and math.isfinite(wall) else end
            for k, v in ev.items():
                x = number(v)
                if k != "step" and x is not None:
                    metrics.append(Metric(k, x, ts, step))
        x = number(final.get("step"))
        final_step = int(x) if x is not None else last_step
        for k, v in final.items():
            x = number(v)
            if k != "step" and x is not None:
                metrics.append(Metric(FINAL_PREFIX + k, x, end, final_step))
        log_metrics(self.client, run_id, metrics)

    # -- the end -----------------------------------------------------------------------------------
    def finish(self, trials: list[dict] | None = None, status: str = "FINISHED",
               objectives: list[tuple[str, str]] | None = None) -> SweepResult:
        """Write the summary table (CSV, Parquet, markdown, PNG, plus every trial as trials.csv) under
        "summary" in the parent run, with `objectives` [(metric, "max"/"min"), ...] also the trials' Pareto
        front over them (pareto.csv/.md/.png), log totals (trials, failed_trials, sweep_wall_s, trials_per_min,
        driver_peak_rss_mib), register the
        best adapter per model x dataset, and end the parent run with `status`.

        `trials` defaults to those given to `log_trial`; trials given here are matched to their child
        runs by "run_id" or params["trial_key"]. Trials that have not ended (Ray's RUNNING, PENDING, PAUSED:
        the sweep was interrupted, its state saved for `sparta sweep resume`) are left out, and the sweep's run
        ends KILLED rather than `status`.
        """
        self._require_open()
        status = _status(status)
        given = self.trials if trials is None else trials
        unended = [t for t in given if str(t.get("status", "FINISHED")).upper() not in _STATUS]
        if unended:
            status = "KILLED"
            log.warning("the sweep was interrupted with %d trial(s) not finished (%s); the summary covers the %d "
                        "that ended; `sparta sweep resume` runs the rest", len(unended),
                        ", ".join(str((t.get("params") or {}).get("trial_key")) for t in unended[:5]),
                        len(given) - len(unended))
        trials = self._with_run_ids([t for t in given if t not in unended])
        try:
            df = summ.summary_table(trials)
            front = pareto_table(trials, objectives) if objectives else None
            with tempfile.TemporaryDirectory() as tmp:
                summ.write_summary(df, tmp)
                summ.trials_table(trials).to_csv(Path(tmp) / "trials.csv", index=False)
                if front is not None:
                    write_pareto(front, objectives, tmp)
                self.client.log_artifacts(self.parent_run_id, tmp, SUMMARY_ARTIFACT)
            failed = sum(t["status"] != "FINISHED" for t in trials)
            walls = [number((t.get("final") or {}).get("wall_s")) for t in trials]
            now = now_ms()
            wall_s = time.time() - self._t0
            totals = {"trials": len(trials), "failed_trials": failed, "finished_trials": len(trials) - failed,
                      "sweep_wall_s": wall_s, "trials_per_min": len(trials) / max(wall_s / 60, 1e-9),
                      "driver_peak_rss_mib": driver_peak_rss_mib(),
                      "trial_wall_s_total": sum(w for w in walls if w is not None and math.isfinite(w))}
            self.client.log_batch(self.parent_run_id, metrics=[Metric(k, float(v), now, 0)
                                                               for k, v in totals.items()])
            registered = (register_best(self.client, self.tracking_uri, self.parent_run_id, trials, df,
                                        self.registry_prefix) if self.register else [])
        except BaseException as e:
            self._end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED",
                      error=f"{type(e).__name__}: {e}")
            raise
        self._end(status)
        return SweepResult(self.parent_run_id, df, registered, front)

    def _with_run_ids(self, trials: list[dict]) -> list[dict]:
        by_key = {t["params"].get("trial_key"): t for t in self.trials}
        out = []
        for t in trials:
            t = dict(t, status=_status(t.get("status", "FINISHED")))
            mine = by_key.get((t.get("params") or {}).get("trial_key"))
            if mine is not None:
                t.setdefault("run_id", mine.get("run_id"))
                t.setdefault("adapter_dir", mine.get("adapter_dir"))
            out.append(t)
        return out

def driver_peak_rss_mib() -> float:
    """This process's peak resident memory (the sweep's driver: Tune's state, the records, MLflow clients)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


# -- reading back ----------------------------------------------------------------------------------
def latest_sweep_run_id(experiment_name: str, tracking_uri: str | None = None) -> str:
    """The newest sweep (parent) run of an experiment."""
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment_name!r} in {client.tracking_uri}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ValueError(f"experiment {experiment_name!r} has no sweep runs")
    return runs[0].info.run_id


def load_trials(experiment_name: str, tracking_uri: str | None = None,
                parent_run_id: str | None = None) -> list[dict]:
    """The trials of a sweep as `log_trial` received them (params decoded, final metrics, status,
    run_id), read from its child runs; the newest sweep of the experiment unless `parent_run_id`."""
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment_name!r} in {uri}")
    parent = parent_run_id or latest_sweep_run_id(experiment_name, uri)
    trials = []
    for run in search_all(client, exp.experiment_id, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'",
                           order_by=["attributes.start_time ASC"]):
        final = {k[len(FINAL_PREFIX):]: v for k, v in run.data.metrics.items() if k.startswith(FINAL_PREFIX)}
        if METRIC_TAG in run.data.tags:
            final["metric"] = run.data.tags[METRIC_TAG]
        trials.append({"params": {k: decode_param(v) for k, v in run.data.params.items()},
                       "final": final, "history": [], "status": run.info.status, "run_id": run.info.run_id})
    return trials




def results_table(experiment_name: str, tracking_uri: str | None = None, parent_run_id: str | None = None):
    """Rebuild `summary.summary_table` from MLflow: the trial child runs of a sweep (by default the newest
    sweep run of the experiment) in the tracking store."""
    return summ.summary_table(load_trials(experiment_name, tracking_uri, parent_run_id))


def sweep_champions(experiment_name: str, tracking_uri: str | None = None, parent_run_id: str | None = None) -> list:
    """The version holding the `champion` alias (a ModelVersion) of each registered model the sweep (by
    default the newest of the experiment) registered a version of; it may come from an earlier sweep."""
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    parent = parent_run_id or latest_sweep_run_id(experiment_name, uri)
    names = sorted({mv.name for mv in client.search_model_versions(f"run_id = '{parent}'")})
    return [mv for mv in (current_champion(client, name) for name in names) if mv is not None]

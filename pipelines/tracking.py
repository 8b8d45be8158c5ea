"""MLflow for sweeps, on the driver only: a parent run per sweep, a child run per trial (params, metrics
per eval step, the adapter folder), the summary table as artifacts, and the best adapter per model x
dataset in the Model Registry as a pyfunc model. Workers never import this; they report through Ray.

    tracker = SweepTracker(experiment="sparta")          # sqlite:///mlruns/mlflow.db by default
    with tracker:                                         # the parent run ends FAILED on an exception
        tracker.start("sweep.yaml", spec_dict)
        for trial in finished_trials:                     # plain dicts, no Ray types
            tracker.log_trial(trial.params, trial.history, trial.final, trial.adapter_dir)
        result = tracker.finish()                         # summary, totals, registry, parent run ends
    model, tok = load_registered("models:/sparta-smollm2-135m-multiemo/1")
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipelines import summary as summ
from workers.ray_trial import NODE_KEY

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "sparta"
ROLE_TAG = "sparta.role"                # "sweep" on parent runs, "trial" on child runs
METRIC_TAG = "sparta.metric"            # the trial's main metric name, e.g. "accuracy"
FINAL_PREFIX = "final/"                 # final metrics of a trial: "final/test_accuracy"
ADAPTER_ARTIFACT = "adapter"            # where a trial's adapter folder lies in its run's artifacts
SUMMARY_ARTIFACT = "summary"
# MLflow's own batch limits (log_batch) and value length limit for params.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS, _MAX_PARAM_LEN = 1000, 100, 100, 6000
# Ray Tune's trial states, accepted as trial statuses besides MLflow's own.
_STATUS = {"FINISHED": "FINISHED", "FAILED": "FAILED", "KILLED": "KILLED",
           "TERMINATED": "FINISHED", "ERROR": "FAILED"}


# -- where things live -----------------------------------------------------------------------------
def tracking_uri_default() -> str:
    """The embedded default store: a sqlite file under ./mlruns (artifacts in ./mlruns/artifacts)."""
    return "sqlite:///mlruns/mlflow.db"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """`tracking_uri`, else $MLFLOW_TRACKING_URI, else the sqlite default; a relative sqlite path is
    made absolute now, so a later change of working directory cannot split the store."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri_default()
    path = _sqlite_path(uri)
    if path is not None and not path.is_absolute():
        uri = "sqlite:///" + str(path.resolve())
    return uri


def artifact_root(tracking_uri: str | None = None) -> Path | None:
    """Artifacts of a sqlite store go beside its database file (mlruns/artifacts); None for other
    stores, whose server decides."""
    path = _sqlite_path(resolve_tracking_uri(tracking_uri))
    return None if path is None else path.parent / "artifacts"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "x"


def setup(tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Make sure `experiment` exists in the store and return its id. On a sqlite store the experiment is
    created with an explicit artifact location (MLflow 3 would otherwise pick a folder relative to the
    working directory); a deleted experiment of that name is restored."""
    uri = resolve_tracking_uri(tracking_uri)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        root = artifact_root(uri)
        location = (root / _safe_name(experiment)).resolve().as_uri() if root is not None else None
        try:
            return client.create_experiment(experiment, artifact_location=location)
        except MlflowException:   # created meanwhile by another process
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


@contextmanager
def _scoped_tracking_uri(uri: str | None) -> Iterator[None]:
    """The fluent API (log_model, register_model, models:/ URIs) reads the process-wide tracking URI;
    set it for the block only and put back exactly what was there (None = unset), as MLflow's own
    download_artifacts(tracking_uri=...) does."""
    if uri is None:
        yield
        return
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield


# -- value conversion ------------------------------------------------------------------------------
def _plain(v):
    if hasattr(v, "item") and callable(v.item):   # numpy / torch scalars from a Ray result
        try:
            return v.item()
        except (TypeError, ValueError):
            pass
    if isinstance(v, Path):
        return str(v)
    return v


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = _plain(v)
    return out


def encode_param(value) -> str:
    """MLflow params are strings: keep strings as they are, JSON for everything else, so that
    `decode_param` gives back ints, floats, booleans, None and lists."""
    value = _plain(value)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= _MAX_PARAM_LEN else text[:_MAX_PARAM_LEN - 3] + "..."


def decode_param(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _number(v) -> float | None:
    v = _plain(v)
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _status(status: str) -> str:
    try:
        return _STATUS[str(status).upper()]
    except KeyError:
        raise ValueError(f"unknown trial status {status!r}; valid: {', '.join(_STATUS)}") from None


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- provenance ------------------------------------------------------------------------------------
def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_tags(*candidates: Path) -> dict[str, str]:
    """The commit (and whether the tree has uncommitted changes) of the first git repository among
    `candidates`; the sparta source folder and the working directory by default. Empty outside git."""
    folders = candidates or (Path(__file__).resolve().parent.parent, Path.cwd())
    for folder in folders:
        commit = _git(["rev-parse", "HEAD"], folder)
        if commit:
            dirty = _git(["status", "--porcelain", "--untracked-files=no"], folder)
            tags = {"mlflow.source.git.commit": commit}
            if dirty is not None:
                tags["sparta.git_dirty"] = str(bool(dirty)).lower()
            return tags
    return {}


def sparta_version() -> str:
    try:
        return importlib.metadata.version("sparta")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- the sweep -------------------------------------------------------------------------------------
@dataclass
class RegisteredAdapter:
    """One adapter put into the Model Registry by `SweepTracker.finish`."""

    name: str
    version: str
    model: str
    dataset: str
    method: str
    trial_key: str
    run_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass
class SweepResult:
    parent_run_id: str
    summary: Any                                     # pandas.DataFrame, as summary.summary_table
    registered: list[RegisteredAdapter] = field(default_factory=list)


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
        self.experiment_id = setup(self.tracking_uri, self.experiment)
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
                params = [Param(k, encode_param(v)) for k, v in _flatten(spec_dict).items()]
                for chunk in _chunks(params, _MAX_PARAMS):
                    self.client.log_batch(self.parent_run_id, params=chunk)
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
        metrics (as "final/<name>"), tags, the adapter folder under "adapter". Returns its run id.

        `status` is FINISHED, FAILED or KILLED (Ray's TERMINATED / ERROR are read as the first two).
        """
        self._require_open()
        status = _status(status)
        params = {k: _plain(v) for k, v in dict(params).items()}
        history = [dict(h) for h in (history or [])]
        final = dict(final or {})
        trial = {"params": params, "history": history, "final": final, "status": status}
        metric = summ.metric_name(trial)
        key = str(params.get("trial_key") or "-".join(
            str(params.get(k, "?")) for k in ("model", "dataset", "method", "seed")))
        params.setdefault("trial_key", key)

        end = _now_ms()
        wall = _number(final.get("wall_s"))
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
        run = self.client.create_run(self.experiment_id, start_time=start, tags=tags, run_name=key)
        run_id = run.info.run_id
        ok = False
        try:
            self._log_params(run_id, params)
            self._log_metrics(run_id, history, final, start, end)
            if adapter_dir is not None:
                if Path(adapter_dir).is_dir():
                    self.client.log_artifacts(run_id, str(adapter_dir), ADAPTER_ARTIFACT)
                else:
                    log.warning("trial %s: adapter folder %s does not exist; not logged", key, adapter_dir)
                    self.client.set_tag(run_id, "sparta.adapter_missing", str(adapter_dir))
            ok = True
        finally:
            self.client.set_terminated(run_id, status if ok else "FAILED", end_time=end if ok else None)
        trial.update(run_id=run_id, adapter_dir=str(adapter_dir) if adapter_dir is not None else None)
        self.trials.append(trial)
        return run_id

    def _log_params(self, run_id: str, params: dict) -> None:
        items = [Param(k, encode_param(v)) for k, v in _flatten(params).items()]
        for chunk in _chunks(items, _MAX_PARAMS):
            self.client.log_batch(run_id, params=chunk)

    def _log_metrics(self, run_id: str, history: list[dict], final: dict, start: int, end: int) -> None:
        metrics: list[Metric] = []
        last_step = 0
        for i, ev in enumerate(history):
            x = _number(ev.get("step"))
            step = int(x) if x is not None else i
            last_step = max(last_step, step)
            wall = _number(ev.get("wall_s"))
            ts = start + int(wall * 1000) if wall is not None and math.isfinite(wall) else end
            for k, v in ev.items():
                x = _number(v)
                if k != "step" and x is not None:
                    metrics.append(Metric(k, x, ts, step))
        x = _number(final.get("step"))
        final_step = int(x) if x is not None else last_step
        for k, v in final.items():
            x = _number(v)
            if k != "step" and x is not None:
                metrics.append(Metric(FINAL_PREFIX + k, x, end, final_step))
        for chunk in _chunks(metrics, _MAX_METRICS):
            self.client.log_batch(run_id, metrics=chunk)

    # -- the end -----------------------------------------------------------------------------------
    def finish(self, trials: list[dict] | None = None, status: str = "FINISHED") -> SweepResult:
        """Write the summary table (CSV, Parquet, markdown, PNG, plus every trial as trials.csv) under
        "summary" in the parent run, log totals (trials, failed_trials, sweep_wall_s), register the best
        adapter per model x dataset, and end the parent run with `status`.

        `trials` defaults to those given to `log_trial`; trials given here are matched to their child
        runs by "run_id" or params["trial_key"].
        """
        self._require_open()
        status = _status(status)
        trials = self._with_run_ids(self.trials if trials is None else trials)
        try:
            df = summ.summary_table(trials)
            with tempfile.TemporaryDirectory() as tmp:
                summ.write_summary(df, tmp)
                summ.trials_table(trials).to_csv(Path(tmp) / "trials.csv", index=False)
                self.client.log_artifacts(self.parent_run_id, tmp, SUMMARY_ARTIFACT)
            failed = sum(t["status"] != "FINISHED" for t in trials)
            walls = [_number((t.get("final") or {}).get("wall_s")) for t in trials]
            now = _now_ms()
            totals = {"trials": len(trials), "failed_trials": failed, "finished_trials": len(trials) - failed,
                      "sweep_wall_s": time.time() - self._t0,
                      "trial_wall_s_total": sum(w for w in walls if w is not None and math.isfinite(w))}
            self.client.log_batch(self.parent_run_id, metrics=[Metric(k, float(v), now, 0)
                                                               for k, v in totals.items()])
            registered = self._register_best(trials, df) if self.register else []
        except BaseException as e:
            self._end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED",
                      error=f"{type(e).__name__}: {e}")
            raise
        self._end(status)
        return SweepResult(self.parent_run_id, df, registered)

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

    def _register_best(self, trials: list[dict], df) -> list[RegisteredAdapter]:
        best = summ.best_trials(trials)
        if not best:
            return []
        done = []
        with tempfile.TemporaryDirectory() as tmp, _scoped_tracking_uri(self.tracking_uri), \
                mlflow.start_run(run_id=self.parent_run_id, nested=mlflow.active_run() is not None):
            # Resuming the parent run: log_model links the model to the active run. Leaving this block
            # ends the run (FINISHED); finish() sets the final status right after.
            code = Path(tmp) / "sparta_adapter_model.py"   # "models from code": a script, not a pickle
            code.write_text(_MODEL_CODE)
            for (model, dataset), trial in best.items():
                adapter = self._fetch_adapter(trial, Path(tmp) / _safe_name(f"{model}-{dataset}"))
                if adapter is None:
                    log.warning("best trial %s of %s x %s has no adapter; nothing registered",
                                trial["params"].get("trial_key"), model, dataset)
                    continue
                row = df[(df["model"] == str(model)) & (df["dataset"] == str(dataset))
                         & (df["method"] == str(trial["params"]["method"]))].iloc[0]
                done.append(self._register(trial, adapter, code, row))
        return done

    def _fetch_adapter(self, trial: dict, dst: Path) -> Path | None:
        """The trial's adapter as recorded in its child run (the system of record), else its local
        folder."""
        run_id = trial.get("run_id")
        if run_id and self.client.list_artifacts(run_id, ADAPTER_ARTIFACT):
            dst.mkdir(parents=True, exist_ok=True)
            return Path(self.client.download_artifacts(run_id, ADAPTER_ARTIFACT, str(dst)))
        local = trial.get("adapter_dir")
        return Path(local) if local and Path(local).is_dir() else None

    def _register(self, trial: dict, adapter: Path, code: Path, row) -> RegisteredAdapter:
        params, final = trial["params"], trial["final"]
        metric = summ.metric_name(trial)
        model, dataset, method = str(params["model"]), str(params["dataset"]), str(params["method"])
        name = registered_model_name(model, dataset, self.registry_prefix)
        config = adapter_model_config(params, adapter)
        info = mlflow.pyfunc.log_model(
            name=_safe_name(f"adapter-{model}-{dataset}"), python_model=str(code),
            artifacts={"adapter": str(adapter)}, model_config=config,
            pip_requirements=pip_requirements(),   # explicit: no import-time inference, no network
            params={"base_model": model, "method": method, "trial_key": str(params.get("trial_key"))})
        val = final.get(f"val_{metric}")
        tags = {"base_model": model, "dataset": dataset, "method": method, "task": config["task"],
                "trial_key": str(params.get("trial_key")), "seed": str(params.get("seed")),
                "metric": metric, f"val_{metric}": str(val),
                f"val_{metric}_mean": str(row["val_mean"]), f"test_{metric}_mean": str(row["test_mean"]),
                "n_seeds": str(row["n_seeds"]), "sweep_run_id": self.parent_run_id,
                "trial_run_id": str(trial.get("run_id"))}
        mv = mlflow.register_model(info.model_uri, name, tags=tags)
        MlflowClient().update_registered_model(
            name, description=f"Best sparta adapter for {model} on {dataset}: highest mean-over-seeds val "
                              f"{metric} of a sweep; base model + adapter folder, loadable with "
                              f"pipelines.tracking.load_registered.")
        if trial.get("run_id"):
            self.client.set_tag(trial["run_id"], "sparta.registered_model", f"{name}/{mv.version}")
        return RegisteredAdapter(name, str(mv.version), model, dataset, method,
                                 str(params.get("trial_key")), trial.get("run_id"))


# -- reading back ----------------------------------------------------------------------------------
def _search_all(client: MlflowClient, experiment_id: str, filter_string: str, order_by=None) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


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
    for run in _search_all(client, exp.experiment_id, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'",
                           order_by=["attributes.start_time ASC"]):
        final = {k[len(FINAL_PREFIX):]: v for k, v in run.data.metrics.items() if k.startswith(FINAL_PREFIX)}
        if METRIC_TAG in run.data.tags:
            final["metric"] = run.data.tags[METRIC_TAG]
        trials.append({"params": {k: decode_param(v) for k, v in run.data.params.items()},
                       "final": final, "history": [], "status": run.info.status, "run_id": run.info.run_id})
    return trials


# -- the registry's model --------------------------------------------------------------------------
def registered_model_name(model: str, dataset: str, prefix: str = "sparta") -> str:
    """`sparta-<model>-<dataset>`, with a folder path reduced to its last part and characters the
    registry refuses ("/", ":") or that read badly in URIs replaced by "-"."""
    base = Path(model).name if ("/" in model or os.sep in model) else model
    return _safe_name(f"{prefix}-{base}-{dataset}")


def pip_requirements() -> list[str]:
    """What a registered adapter needs, pinned to this environment (sparta itself included)."""
    reqs = []
    for dist in ("sparta", "mlflow", "torch", "transformers", "safetensors"):
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _head_num_labels(adapter_dir: Path) -> int | None:
    """The adapter's task head size, if it carries a head (a classifier); None for a causal LM."""
    from safetensors import safe_open

    from adapters.handle import WEIGHTS_FILE

    with safe_open(str(adapter_dir / WEIGHTS_FILE), framework="numpy") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys() if k.startswith("head.") and k.endswith(".weight")]
    rows = [s[0] for s in shapes if len(s) == 2]
    return min(rows) if rows else None   # the output projection: (num_labels, hidden)


def base_task(model: str) -> str:
    """The task a base model is loaded for when nothing says otherwise: encoders classify, decoders
    are causal LMs (workers.assets' kind for aliases, the architecture for random and folder models)."""
    from workers.assets import MODELS

    if model in MODELS:
        return "classification" if MODELS[model].kind == "encoder" else "causal_lm"
    if model.startswith("random:"):
        arch = model.removeprefix("random:").removesuffix("-tiny")
        return "classification" if arch in ("bert", "roberta", "deberta-v2") else "causal_lm"
    try:
        cfg = json.loads((Path(model).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return "classification"
    causal = any(a.endswith("ForCausalLM") for a in cfg.get("architectures") or [])
    return "causal_lm" if causal else "classification"


def adapter_model_config(params: dict, adapter_dir: str | os.PathLike) -> dict:
    """The pyfunc model config of a registered adapter: how to rebuild its base model offline.

    task: params["task"], else "classification" when the adapter carries a task head, else the base's
    kind; num_labels: params["num_labels"], else the head's size; model_overrides: params
    ["model_overrides"] (config fields given to workers.assets.load_model at training)."""
    adapter_dir = Path(adapter_dir)
    model = str(params["model"])
    head = _head_num_labels(adapter_dir)
    task = params.get("task") or ("classification" if head else base_task(model))
    num_labels = params.get("num_labels") or (head if task == "classification" else None)
    return {"base_model": model, "task": task, "num_labels": num_labels,
            "model_overrides": dict(params.get("model_overrides") or {}),
            "method": str(params.get("method")), "trial_key": str(params.get("trial_key"))}


class AdapterModel(mlflow.pyfunc.PythonModel):
    """A registered sparta adapter: artifact "adapter" is the adapter folder; the model config names the
    base model (alias, folder or random:<arch>-tiny), task, num_labels and config overrides.

    `unwrap_python_model()` gives this object: `.adapter_dir`, `.base_model`, `.task`, and `.load()`
    for (model, tokenizer). `predict` takes texts and returns labels (classification) or greedy
    continuations (causal LM, `max_new_tokens` from params, default 32).
    """

    def load_context(self, context) -> None:
        cfg = dict(context.model_config or {})
        self.adapter_dir = Path(context.artifacts["adapter"])
        self.base_model = cfg["base_model"]
        self.task = cfg["task"]
        self.num_labels = cfg.get("num_labels")
        self.model_overrides = dict(cfg.get("model_overrides") or {})
        self.method = cfg.get("method")
        self.trial_key = cfg.get("trial_key")
        self._cached = None

    def load(self, merge: bool = False, dtype=None):
        """(model, tokenizer): the base model loaded offline with the adapter applied (`merge=True`
        folds it into plain layers, as serving wants), in eval mode."""
        import adapters
        from workers.assets import load_model

        model, tok = load_model(self.base_model, task=self.task, num_labels=self.num_labels, dtype=dtype,
                                **self.model_overrides)
        handle = adapters.load(model, self.adapter_dir)
        if merge:
            model = handle.merge()
        return model.eval(), tok

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        import torch

        if self._cached is None:
            self._cached = self.load(merge=True)
        model, tok = self._cached
        if tok is None:
            raise ValueError(f"base model {self.base_model!r} has no tokenizer (a random tiny model): "
                             "predict needs one; use load() and feed token ids")
        texts = [str(t) for t in model_input]
        with torch.no_grad():
            if self.task == "classification":
                enc = tok(texts, return_tensors="pt", padding=True, truncation=True)
                ids = model(**enc).logits.argmax(-1).tolist()
                return [str(model.config.id2label.get(i, i)) for i in ids]
            tok.padding_side = "left"
            enc = tok(texts, return_tensors="pt", padding=True)
            out = model.generate(**enc, do_sample=False, pad_token_id=tok.pad_token_id,
                                 max_new_tokens=int((params or {}).get("max_new_tokens", 32)))
            return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


_MODEL_CODE = """from mlflow.models import set_model

from pipelines.tracking import AdapterModel

set_model(AdapterModel())
"""


def load_registered(uri: str, tracking_uri: str | None = None, *, merge: bool = False, dtype=None):
    """(model, tokenizer) of a registered adapter, e.g. "models:/sparta-smollm2-135m-multiemo/1": the
    base model loaded offline (workers.assets.load_model) with the adapter applied (adapters.load).
    Tokenizer is None for random tiny models."""
    with _scoped_tracking_uri(resolve_tracking_uri(tracking_uri) if tracking_uri else None):
        pyfunc = mlflow.pyfunc.load_model(uri)
    inner = pyfunc.unwrap_python_model()
    if not isinstance(inner, AdapterModel):
        raise ValueError(f"{uri} is not a sparta adapter model (its python model is {type(inner).__name__})")
    return inner.load(merge=merge, dtype=dtype)


# -- the UI ----------------------------------------------------------------------------------------
def ui_command(port: int = 5000, tracking_uri: str | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and environment of `mlflow server` for a store, bound to 127.0.0.1 (one worker, no job
    runner: browsing needs neither). The sqlite default gets its artifact root mlruns/artifacts."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        raise ValueError(f"{uri} is a tracking server already: open it in a browser")
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--host", "127.0.0.1", "--port", str(int(port)), "--workers", "1"]
    root = artifact_root(uri)
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        argv += ["--default-artifact-root", str(root.resolve())]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    return argv, env

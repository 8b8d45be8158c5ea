"""MLflow helpers every stage shares: where the store lives (the sqlite default under ./mlruns), experiments
with an explicit artifact location, params as JSON strings, batched logging, paged search, provenance
tags, and the UI server command. Used by the sweeps, serving and evaluation pipelines; workers never
import MLflow."""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from pipelines import PROJECT_ROOT

DEFAULT_EXPERIMENT = "sparta"
ROLE_TAG = "sparta.role"                # "sweep", "trial", "serve", "eval": what a run is
# MLflow's own batch limits (log_batch) and value length limit for params.
MAX_METRICS, MAX_PARAMS, MAX_PARAM_LEN = 1000, 100, 6000


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


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "x"


def ensure_experiment(tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT) -> str:
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
        location = (root / safe_name(experiment)).resolve().as_uri() if root is not None else None
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
def scoped_tracking_uri(uri: str | None) -> Iterator[None]:
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
def plain(v):
    if hasattr(v, "item") and callable(v.item):   # numpy / torch scalars from a Ray result
        try:
            return v.item()
        except (TypeError, ValueError):
            pass
    if isinstance(v, Path):
        return str(v)
    return v


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = plain(v)
    return out


def encode_param(value) -> str:
    """MLflow params are strings: keep strings as they are, JSON for everything else, so that
    `decode_param` gives back ints, floats, booleans, None and lists."""
    value = plain(value)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_LEN else text[:MAX_PARAM_LEN - 3] + "..."


def decode_param(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def number(v) -> float | None:
    v = plain(v)
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def now_ms() -> int:
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
    folders = candidates or (PROJECT_ROOT, Path.cwd())
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




def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    """Every (nested) entry of `params` as a run param ("a.b" for nested keys), in MLflow-sized batches."""
    items = [Param(k, encode_param(v)) for k, v in flatten(params).items()]
    for i in range(0, len(items), MAX_PARAMS):
        client.log_batch(run_id, params=items[i:i + MAX_PARAMS])


def log_metrics(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    for i in range(0, len(metrics), MAX_METRICS):
        client.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS])


def search_all(client: MlflowClient, experiment_id: str, filter_string: str, order_by=None) -> list:
    """Every run of an experiment matching `filter_string`, across result pages."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


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

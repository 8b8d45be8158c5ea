"""`sparta serve`: turn a serve spec into a Ray Serve application of `workers.serving.replica.Replica` and deploy
it, on a local Ray bound to loopback or on a cluster; report its status; shut it down.

    spec = load_serve_spec("examples/serve-tiny.yaml")
    app = build_app(spec)             # resolves models:/ and runs:/ URIs through MLflow first
    url = deploy(spec, app)           # starts Ray (127.0.0.1) and Serve's proxy on spec.host:spec.port
    run = metrics_run.open_metrics_run(spec)   # the deployment's MLflow run; build_app(spec, metrics=run) feeds it

Registry URIs are resolved here, on the deploying machine (base model, task, config overrides, the
version an alias points to now); the replica gets plain values, and for a registry adapter a reference
to its files in MLflow (workers.serving.artifacts.ArtifactRef), which it downloads on its own node through
the tracking server: on a cluster it runs where the deploying machine's disk is not.
"""
from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.ray_local import quiet_driver, ray_env, start_ray
from pipelines.serving.metrics_run import MetricsRun, open_metrics_run
from pipelines.serving.spec import FieldError, ServeSpec, ServeSpecError, is_registry_uri

DEPLOYMENT = "SpartaReplica"


@dataclass(frozen=True)
class ResolvedModel:
    """What a replica loads: a base model name or folder, an adapter folder, config overrides."""

    model: str
    adapter: str | None = None
    model_overrides: dict = field(default_factory=dict)
    source: str = ""   # the spec's model (a registry URI, an alias or a folder)
    adapters: dict = field(default_factory=dict)   # served unmerged by name: name -> local adapter folder
    # where replicas fetch a registry adapter (workers.serving.artifacts.ArtifactRef), for `adapter` / by name
    adapter_source: dict | None = None
    adapter_sources: dict = field(default_factory=dict)


def _fresh_dir(uri: str) -> Path:
    from workers.data.assets import cache_dir, path_safe

    path = cache_dir() / "serve" / "registry" / path_safe(uri)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _from_pyfunc(uri: str, tracking_uri: str, local: str | None = None, remote: str | None = None) -> ResolvedModel:
    """A logged sparta model: `uri` (models:/...), or downloaded already to `local` from `remote` (runs:/...)."""
    import mlflow

    from pipelines.sweeps.registry import AdapterModel

    pyfunc = mlflow.pyfunc.load_model(local or uri, **({} if local else {"dst_path": str(_fresh_dir(uri))}))
    inner = pyfunc.unwrap_python_model()
    if not isinstance(inner, AdapterModel):
        raise ValueError(f"{uri} is not a sparta adapter model (its python model is {type(inner).__name__})")
    if inner.task != "causal_lm":
        raise ValueError(f"{uri} adapts {inner.base_model} for {inner.task}; serving needs a causal LM adapter")
    adapter = Path(inner.adapter_dir)
    root = next(p for p in adapter.parents if (p / "MLmodel").is_file())   # the model's folder
    where, pinned = (remote, remote) if remote else _model_version_files(uri, tracking_uri)
    ref = {"artifact_uri": f"{where.rstrip('/')}/{adapter.relative_to(root).as_posix()}", "tracking_uri": tracking_uri,
           "source": pinned}
    return ResolvedModel(inner.base_model, str(adapter), dict(inner.model_overrides), uri, adapter_source=ref)


def _model_version_files(uri: str, tracking_uri: str) -> tuple[str, str]:
    """(artifact URI of a registered model version's files, "models:/NAME/VERSION") for models:/NAME/VERSION
    or models:/NAME@ALIAS: the version an alias names now, so every replica serves the same one however the
    alias moves later."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = str(client.get_model_version_by_alias(name, alias).version)
    else:
        name, version = rest.rsplit("/", 1)
    return client.get_model_version_download_uri(name, version), f"models:/{name}/{version}"


def _from_run(uri: str, tracking_uri: str) -> ResolvedModel:
    """runs:/RUN_ID/PATH: a logged sparta model, or a trial's raw adapter folder (base model from the run's params)."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.mlflow_store import decode_param
    from pipelines.sweeps.registry import adapter_model_config

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(_fresh_dir(uri)),
                                                     tracking_uri=tracking_uri))
    if (local / "MLmodel").is_file():
        return _from_pyfunc(uri, tracking_uri, str(local), remote=uri)
    if not (local / "adapter_config.json").is_file():
        raise ValueError(f"{uri} is neither a logged sparta model (no MLmodel) nor an adapter folder")
    raw = MlflowClient(tracking_uri).get_run(uri.removeprefix("runs:/").split("/")[0]).data.params
    params = {k: decode_param(v) for k, v in raw.items() if "." not in k}
    params["model_overrides"] = {k.split(".", 1)[1]: decode_param(v) for k, v in raw.items()
                                 if k.startswith("model_overrides.")}
    if "model" not in params:
        raise ValueError(f"the run of {uri} has no 'model' param: which base model the adapter belongs to is unknown")
    cfg = adapter_model_config(params, local)
    if cfg["task"] != "causal_lm":
        raise ValueError(f"{uri} adapts {cfg['base_model']} for {cfg['task']}; serving needs a causal LM adapter")
    return ResolvedModel(cfg["base_model"], str(local), cfg["model_overrides"], uri,
                         adapter_source={"artifact_uri": uri, "tracking_uri": tracking_uri, "source": uri})


def resolve_model(spec: ServeSpec) -> ResolvedModel:
    """The spec's model and adapters as plain values; ServeSpecError (on `model` or `adapters[i]`) when a
    registry URI cannot be used or an adapter belongs to another base model."""
    if spec.adapters:
        folders, sources = _resolve_adapters(spec)
        if spec.merge:
            first = next(iter(folders))
            return ResolvedModel(spec.model, folders[first], dict(spec.model_overrides), spec.model,
                                 adapter_source=sources.get(first))
        return ResolvedModel(spec.model, None, dict(spec.model_overrides), spec.model, folders, adapter_sources=sources)
    if not is_registry_uri(spec.model):
        return ResolvedModel(spec.model, spec.adapter, dict(spec.model_overrides), spec.model)
    got = _resolve_uri(spec, spec.model, "model")
    overrides = {**got.model_overrides, **spec.model_overrides}
    try:
        spec.check_limits(got.model, overrides)
    except FieldError as e:
        raise ServeSpecError([(".".join(e.path), str(e))]) from None
    return ResolvedModel(got.model, got.adapter, overrides, spec.model, adapter_source=got.adapter_source)


def _resolve_uri(spec: ServeSpec, uri: str, field_name: str) -> ResolvedModel:
    from pipelines.mlflow_store import resolve_tracking_uri, scoped_tracking_uri

    tracking = resolve_tracking_uri(spec.tracking_uri)
    try:
        with scoped_tracking_uri(tracking):
            return _from_pyfunc(uri, tracking) if uri.startswith("models:/") else _from_run(uri, tracking)
    except Exception as e:   # MLflow raises its own types for a missing model, version or run
        raise ServeSpecError([(field_name, f"cannot resolve {uri} in {tracking}: {e}")]) from None


def _same_base(a: str, b: str) -> bool:
    from workers.data.assets import resolve_model_path

    if a == b:
        return True
    if a.startswith("random:") or b.startswith("random:"):
        return False
    try:
        return Path(resolve_model_path(a)).resolve() == Path(resolve_model_path(b)).resolve()
    except Exception:
        return False


def _resolve_adapters(spec: ServeSpec) -> tuple[dict[str, str], dict[str, dict]]:
    """(name -> local folder of every adapter the spec lists, name -> where replicas fetch the registry
    ones); registry ones must adapt the spec's base model."""
    out, sources = {}, {}
    for i, entry in enumerate(spec.adapters):
        where = f"adapters[{i}].uri"
        if not is_registry_uri(entry.uri):
            out[entry.served_name] = entry.uri
            continue
        got = _resolve_uri(spec, entry.uri, where)
        if not _same_base(got.model, spec.model):
            raise ServeSpecError([(where, f"{entry.uri} adapts {got.model}, not this deployment's model {spec.model}")])
        differ = sorted(k for k, v in got.model_overrides.items() if spec.model_overrides.get(k) != v)
        if differ:   # the base must be the one the adapter was trained on, config overrides included
            raise ServeSpecError([(where, f"{entry.uri} was trained with model_overrides {got.model_overrides}; give "
                                          f"the same in the spec (it has {spec.model_overrides})")])
        out[entry.served_name] = got.adapter
        sources[entry.served_name] = got.adapter_source
    return out, sources


def engine_config(spec: ServeSpec, resolved: ResolvedModel) -> dict:
    """workers.serving.engine.EngineConfig fields for the replica (plain values; registry adapters as
    ArtifactRefs, which the replica fetches: workers.serving.artifacts)."""
    art = spec.art_config()
    adapters = {name: resolved.adapter_sources.get(name) or folder for name, folder in resolved.adapters.items()}
    return {"model": resolved.model, "name": spec.served_name, "adapter": resolved.adapter_source or resolved.adapter,
            "tokenizer": spec.tokenizer, "model_overrides": dict(resolved.model_overrides), "dtype": spec.dtype,
            "device": spec.device, "policy": spec.kv.policy, "policy_ratio": spec.kv.ratio,
            "art": art.to_dict() if art.active else None, "max_context": spec.max_context,
            "max_new_tokens": spec.max_new_tokens, "threads": max(1, round(spec.cpus_per_replica)),
            "scheduler": spec.scheduler.kind, "kv_cache_tokens": spec.kv_cache_tokens,
            "max_prefill_tokens": spec.scheduler.max_prefill_tokens, "max_queued": spec.scheduler.max_queued,
            "sampling": spec.sampling.model_dump(), "adapters": adapters,
            "max_adapters": spec.max_adapters, "runtime_adapters": spec.runtime_adapters and not spec.merge}


def deployment_options(spec: ServeSpec) -> dict:
    gpus = spec.gpus_per_replica if spec.gpus_per_replica is not None else (1 if spec.device == "cuda" else 0)
    opts: dict = {"name": DEPLOYMENT, "max_ongoing_requests": spec.ongoing_requests,
                  "ray_actor_options": {"num_cpus": spec.cpus_per_replica, "num_gpus": gpus,
                                        "runtime_env": {"env_vars": ray_env()}},
                  # model loading takes a while on a busy machine; the default 30 s health check is too short
                  "health_check_timeout_s": 120, "graceful_shutdown_timeout_s": 10}
    if isinstance(spec.replicas, int):
        opts["num_replicas"] = spec.replicas
    else:
        a = spec.replicas
        opts["autoscaling_config"] = {"min_replicas": a.min, "max_replicas": a.max, "initial_replicas": a.min,
                                      "target_ongoing_requests": a.target_ongoing_requests}
    return opts


def build_app(spec: ServeSpec, resolved: ResolvedModel | None = None, metrics: MetricsRun | None = None):
    """The Serve application (not yet running). Resolves the model first, so its errors come before Ray.
    `metrics`: the deployment's MLflow run, which every replica reports to (open_metrics_run)."""
    from workers.serving.replica import Replica

    resolved = resolved or resolve_model(spec)
    return Replica.options(**deployment_options(spec)).bind(
        engine_config(spec, resolved), spec.resolved_api_key(), spec.batching.max_batch_size,
        spec.batching.wait_timeout_s, metrics=metrics.replica_args() if metrics else None)


# -- Ray and Serve ---------------------------------------------------------------------------------
def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the proxy binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeSpecError([("port", f"{host}:{port} is not free ({e.strerror or e}); pick another port")]) from None


def deploy(spec: ServeSpec, app=None, address: str | None = None, check_port: bool = True) -> str:
    """Deploy (or update) the spec's application and return its URL once every replica is up. Without
    `app`, builds it with a new metrics run (left running: `end_metrics_runs` ends it at shutdown).
    check_port=False: this process's Serve proxy already holds the port (a further app on it)."""
    from ray import serve

    run = None
    if app is None:
        resolved = resolve_model(spec)
        run = open_metrics_run(spec, resolved)
        app = build_app(spec, resolved, run)
    try:
        if not address and check_port:
            check_port_free(spec.host, spec.port)
        start_ray(address)
        serve.start(http_options={"host": spec.host, "port": spec.port})
        quiet_driver()   # serve.start set up its console logger
        serve.run(app, name=spec.served_name, route_prefix=spec.route_prefix, blocking=False)
    except BaseException:
        if run is not None:
            run.end("FAILED")
        raise
    return spec.url


def status_rows() -> list[dict]:
    """Per application and deployment: status and replica states (Ray must be connected)."""
    from ray import serve

    def text(v) -> str:
        return str(getattr(v, "value", v))

    out = []
    for name, app in serve.status().applications.items():
        for dname, dep in app.deployments.items():
            out.append({"application": name, "status": text(app.status), "deployment": dname,
                        "deployment_status": text(dep.status),
                        "replicas": {text(k): v for k, v in dep.replica_states.items()},
                        "message": dep.message or app.message})
    return out



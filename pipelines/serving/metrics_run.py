"""The MLflow run of one deployment: opened by the driver before the replicas start, fed by every replica
(workers.serving.metrics) every `metrics_interval_s`, ended when the deployment stops."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines import mlflow_store as store
from pipelines.serving.spec import ServeSpec

ROLE = "serve"   # the sparta.role tag of deployment runs
APP_TAG = "sparta.serve.app"


@dataclass(frozen=True)
class MetricsRun:
    """The MLflow run of one deployment: replicas log to it (workers.serving.metrics), the driver ends it."""

    tracking_uri: str
    run_id: str
    interval_s: float

    def replica_args(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "interval_s": self.interval_s}

    def end(self, status: str = "FINISHED") -> None:
        from mlflow import MlflowClient

        MlflowClient(self.tracking_uri).set_terminated(self.run_id, status)


def open_metrics_run(spec: ServeSpec, resolved=None) -> MetricsRun | None:
    """Create the deployment's run in `spec.metrics_experiment` (params: the spec without its API key, and
    the resolved model, a deploy.ResolvedModel); None when `metrics_interval_s` is 0."""
    if spec.metrics_interval_s <= 0:
        return None
    from mlflow import MlflowClient

    uri = store.resolve_tracking_uri(spec.tracking_uri)
    client = MlflowClient(uri)
    tags = {store.ROLE_TAG: ROLE, APP_TAG: spec.served_name, "sparta.serve.url": spec.url, **store.git_tags()}
    run = client.create_run(store.ensure_experiment(uri, spec.metrics_experiment), run_name=spec.served_name,
                            tags=tags)
    values = spec.model_dump(mode="json", exclude={"api_key"})
    from workers.hardware import resolve_device, resolve_dtype

    values["resolved"] = {"dtype": resolve_dtype(spec.dtype, resolve_device(spec.device))}   # as a local replica has it
    if resolved is not None:
        values["resolved"].update({"model": resolved.model, "adapter": resolved.adapter,
                                   "adapters": list(resolved.adapters)})   # names: "@" is no param-key character
    store.log_params(client, run.info.run_id, values)
    return MetricsRun(uri, run.info.run_id, spec.metrics_interval_s)


def end_metrics_runs(app: str | None = None, tracking_uri: str | None = None,
                     experiment: str = "sparta-serve") -> list[str]:
    """End (FINISHED) the running deployment runs of `app` (every app when None); their ids. For a
    cluster's `serve shutdown --address`, whose driver did not stay to end them."""
    from mlflow import MlflowClient

    client = MlflowClient(store.resolve_tracking_uri(tracking_uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = f"tags.`{store.ROLE_TAG}` = '{ROLE}' and attributes.status = 'RUNNING'"
    if app:
        query += f" and tags.`{APP_TAG}` = '{app}'"
    ids = [r.info.run_id for r in store.search_all(client, exp.experiment_id, query)]
    for run_id in ids:
        client.set_terminated(run_id, "FINISHED")
    return ids

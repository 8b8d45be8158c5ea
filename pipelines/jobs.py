"""Submitting a sweep to a Ray cluster as a Ray Job, and following it (status, logs, stop).

The job runs the same driver as a local sweep (`python -m pipelines.cli sweep run SPEC`) on the head node,
with the project as its working directory and the tracking URI and offline settings in its environment.
"""
from __future__ import annotations

import shlex
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv", ".git", "mlruns", "bench-results", "sweeps", "**/__pycache__", "*.egg-info"]


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(spec_path: Path, address: str, tracking_uri: str | None = None, env: dict[str, str] | None = None) -> str:
    """Submit the sweep in `spec_path` to the cluster's Jobs API at `address` (http://HEAD:8265); returns
    the job id. The spec travels inside the working directory (copied next to the project if it is
    outside it)."""
    from pipelines.sweep import ray_env

    spec_path = Path(spec_path).resolve()
    try:
        rel = spec_path.relative_to(PROJECT)
    except ValueError:   # a spec outside the project travels in a (git-ignored) folder of it
        rel = Path(".sparta-jobs") / spec_path.name
        (PROJECT / rel).parent.mkdir(exist_ok=True)
        (PROJECT / rel).write_text(spec_path.read_text())
    env_vars = {**ray_env(), **(env or {})}
    command = f"python -m pipelines.cli sweep run {shlex.quote(str(rel))}"
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
        command += f" --tracking-uri {shlex.quote(tracking_uri)}"
    return client(address).submit_job(
        entrypoint=command,
        runtime_env={"working_dir": str(PROJECT), "excludes": EXCLUDES, "env_vars": env_vars},
        metadata={"sparta": "sweep", "spec": spec_path.name},
    )


def status(job_id: str, address: str) -> str:
    return str(client(address).get_job_status(job_id).value)


def logs(job_id: str, address: str) -> str:
    return client(address).get_job_logs(job_id)


def stop(job_id: str, address: str) -> bool:
    return client(address).stop_job(job_id)

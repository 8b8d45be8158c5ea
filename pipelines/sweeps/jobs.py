"""Submitting a sweep to a Ray cluster as a Ray Job, and following it (status, logs, stop).

The job runs the same driver as a local sweep (`python -m pipelines.cli sweep run SPEC`) on the head node,
with the project as its working directory and the tracking URI and offline settings in its environment.
"""
from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path

from pipelines import PROJECT_ROOT

PROJECT = PROJECT_ROOT
# not copied into a job's working directory (names matched at any depth)
EXCLUDES = [".venv", ".git", "mlruns", "bench-results", "sweeps", "__pycache__", "*.egg-info", ".pytest_cache"]
JOB_SPEC = "sparta-job/spec.yaml"   # where the submitted spec lies in the job's working directory


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(spec_path: Path, address: str, tracking_uri: str | None = None, storage: str | None = None,
           env: dict[str, str] | None = None) -> str:
    """Submit the sweep in `spec_path` to the cluster's Jobs API at `address` (http://HEAD:8265); returns
    the job id. The job's working directory is a copy of the project with the spec at JOB_SPEC. A sqlite
    tracking URI or a storage folder is made absolute here: it names a path on the head node (the same
    machine for a single-box cluster; use an MLflow server and shared storage on a real one)."""
    from pipelines.mlflow_store import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(tracking_uri)
    command = f"python -m pipelines.cli sweep run {JOB_SPEC} --tracking-uri {shlex.quote(tracking_uri)}"
    if storage:
        command += f" --storage {shlex.quote(str(Path(storage).resolve()))}"
    return submit_command(command, address, {**(env or {}), "MLFLOW_TRACKING_URI": tracking_uri},
                          {"sparta": "sweep", "spec": Path(spec_path).name}, spec_path)


def submit_resume(experiment: str, address: str, storage: str | None = None, tracking_uri: str | None = None,
                  env: dict[str, str] | None = None) -> str:
    """Submit `sparta sweep resume EXPERIMENT` as a Ray Job: a driver on the head node continues the sweep
    whose state lies in `storage` (the folder every node reaches), in the MLflow run it started. The
    tracking URI defaults to the one the sweep recorded."""
    from pipelines.mlflow_store import resolve_tracking_uri

    command = f"python -m pipelines.cli sweep resume {shlex.quote(experiment)}"
    if storage:
        command += f" --storage {shlex.quote(str(Path(storage).resolve()))}"
    env = dict(env or {})
    if tracking_uri:
        tracking_uri = resolve_tracking_uri(tracking_uri)
        command += f" --tracking-uri {shlex.quote(tracking_uri)}"
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return submit_command(command, address, env, {"sparta": "sweep-resume", "experiment": experiment})


def submit_command(command: str, address: str, env: dict[str, str], metadata: dict[str, str],
                   spec_path: Path | None = None) -> str:
    """Submit `command` as a Ray Job whose working directory is a copy of the project (with `spec_path`
    at JOB_SPEC) and whose environment has sparta's Ray settings plus `env`; returns the job id."""
    from pipelines.ray_local import ray_env

    with tempfile.TemporaryDirectory(prefix="sparta-job-") as staging:
        workdir = Path(staging) / "project"
        shutil.copytree(PROJECT, workdir, ignore=shutil.ignore_patterns(*EXCLUDES))
        if spec_path is not None:
            (workdir / JOB_SPEC).parent.mkdir()
            shutil.copyfile(spec_path, workdir / JOB_SPEC)
        return client(address).submit_job(entrypoint=command,
                                          runtime_env={"working_dir": str(workdir), "env_vars": {**ray_env(), **env}},
                                          metadata=metadata)


def status(job_id: str, address: str) -> str:
    return str(client(address).get_job_status(job_id).value)


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def wait(job_id: str, address: str, poll_s: float = 2.0, timeout_s: float = float("inf")) -> str:
    """Block until the job reaches a terminal state; returns it."""
    from pipelines.http import wait_until

    return wait_until(lambda: (s := status(job_id, address)) in TERMINAL and s, timeout_s, f"Ray Job {job_id}", poll_s)


def logs(job_id: str, address: str) -> str:
    return client(address).get_job_logs(job_id)


def follow_logs(job_id: str, address: str):
    """The job's output as it is written, until the job ends (Ray's log tail over a websocket)."""
    import asyncio

    tail = client(address).tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(tail.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def stop(job_id: str, address: str) -> bool:
    return client(address).stop_job(job_id)

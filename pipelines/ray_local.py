"""Starting or joining Ray the way every sparta command does: loopback only, no usage stats, offline
model loading, sparta's caches passed on to the workers, and Ray's own chatter kept in its log files."""
from __future__ import annotations

import logging
import os
from pathlib import Path

# Environment the driver and every worker need (Ray binds the interface address unless told otherwise).
_FIXED = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
          "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
          # Tune's console reporter (configuration box, TensorBoard hint): sparta prints its own progress
          "RAY_AIR_NEW_OUTPUT": "0"}
# Ray Train gives a worker group 60 s to start; several trials starting at once on a small CPU (each worker
# imports torch, transformers and DeepSpeed) take longer, and a timed-out start costs a retry.
_DEFAULTS = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}
# Only for a Ray started here: one machine has no node that can be preempted, and Ray Train's watcher of
# preemption notices is one more actor process per trial (~5 s of CPU each on a small CPU).
_LOCAL = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
_PASSED_ON = ("SPARTA_CACHE", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "MLFLOW_TRACKING_URI")


def ray_env() -> dict[str, str]:
    """The environment variables of a Ray job, actor or task started by sparta."""
    env = dict(_FIXED)
    env.update({k: os.environ.get(k) or v for k, v in _DEFAULTS.items()})
    env.update({k: os.environ[k] for k in _PASSED_ON if os.environ.get(k)})
    return env


def start_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Join a cluster (`address`: HOST:PORT of its GCS, ray://HOST:PORT or auto; or RAY_ADDRESS inside a
    Ray Job) or start Ray here on 127.0.0.1, with the dashboard (Ray Jobs need it) when asked. A no-op when
    this process is connected already."""
    import ray

    env = ray_env()
    os.environ.update({k: v for k, v in env.items() if k.startswith(("RAY_", "TUNE_"))})
    if ray.is_initialized():
        return
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)   # raylet warnings stay in Ray's logs
    if address and address.startswith(("http://", "https://")):
        raise ValueError(f"--address {address}: give the cluster's GCS address (HOST:6379), ray://HOST:10001 or "
                         "auto; an http:// address is the dashboard's (Ray Jobs)")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, **quiet)
    elif os.environ.get("RAY_ADDRESS"):   # a Ray Job's driver: the job's runtime env already carries ray_env()
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
    else:
        env.update({k: os.environ.get(k) or v for k, v in _LOCAL.items()})
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": env}, **quiet)
    quiet_driver()


def quiet_driver() -> None:
    """Keep Ray's and MLflow's own chatter off this process's console (sparta prints its own progress):
    Serve's INFO lines, MLflow's store and registry notices, and the raylet's warnings, which Ray's driver
    prints from a thread of its own whatever log_to_driver says; those go to `raylet-messages.log` in
    the Ray session's log folder instead."""
    import ray._private.worker as ray_worker

    for name in ("ray.serve", "mlflow", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        log_dir = Path(ray_worker.global_worker.node.get_logs_dir_path())
    except Exception:   # a client connection has no local session folder
        return
    if getattr(ray_worker.print_to_stdstream, "_sparta", False):
        return
    printer = ray_worker.print_to_stdstream

    def to_file(data, ignore_prefix: bool):
        if data.get("pid") == "raylet":
            with open(log_dir / "raylet-messages.log", "a") as f:
                f.write("\n".join(data.get("lines", [])) + "\n")
            return
        printer(data, ignore_prefix)

    to_file._sparta = True
    ray_worker.print_to_stdstream = to_file

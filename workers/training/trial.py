"""What runs inside each Ray Train worker of a sweep trial: Ray's dict in, `workers.training.loop.train` called,
its reports and checkpoints handed to Ray. Ray stays at the edge: the loop itself knows nothing of it."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

NODE_KEY = "ray_node_id"       # reported with every eval (a string: a tag in MLflow, not a metric)
CRASH_KEY = "_crash_at_step"   # fault injection for tests: the worker process dies at that step, once
THREADS_KEY = "_threads"       # torch threads: the worker's CPU reservation, rounded (Ray's OMP_NUM_THREADS floors it)
# Reported with every eval, for `sparta bench overhead`'s breakdown: when (epoch seconds) the loop began, and
# how long the trial's earlier `ray.train.report` calls took (Ray persisting their checkpoints).
LOOP_STARTED_KEY, RAY_REPORT_KEY = "loop_started_at", "ray_report_s"


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch

    from workers.training.loop import TrainConfig, train

    if config.get(THREADS_KEY):   # 1.9 CPUs reserved: 2 threads, where Ray's OMP_NUM_THREADS=1 would idle a core
        torch.set_num_threads(int(config[THREADS_KEY]))

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in config.items() if k in fields})
    crash_at = config.get(CRASH_KEY)
    crash_marker = Path(config.get("_crash_marker", "")) if crash_at else None
    node_id = ray.get_runtime_context().get_node_id()   # where rank 0 ran: tagged on the trial's MLflow run
    timing = {LOOP_STARTED_KEY: time.time(), RAY_REPORT_KEY: 0.0}

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        # Every rank hands over its folder; Ray merges them into one checkpoint directory. Rank 0 wrote
        # the adapter, trainer state and DeepSpeed's model states; each rank its own ZeRO optimizer
        # partition and RNG file (rank-named, so the merge is safe).
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        t0 = time.perf_counter()
        ray.train.report({**metrics, NODE_KEY: node_id, "torch_threads": torch.get_num_threads(), **timing},
                         checkpoint=checkpoint)
        timing[RAY_REPORT_KEY] += time.perf_counter() - t0
        if crash_at and metrics.get("step", 0) >= crash_at and not crash_marker.exists():
            crash_marker.write_text(json.dumps({"pid": os.getpid(), "step": metrics["step"]}))
            os._exit(1)   # as abrupt as a killed process: no cleanup, no exception handling

    checkpoint = ray.train.get_checkpoint()
    with (checkpoint.as_directory() if checkpoint else nullcontext(None)) as resume_from, \
            tempfile.TemporaryDirectory(prefix="sparta-ckpt-") as scratch:
        train(cfg, report=report, checkpoint_dir=scratch, resume_from=resume_from)

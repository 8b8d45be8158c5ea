"""`sparta bench overhead SPEC`: what the orchestration adds to one trial.

The same trial (the spec's first, or `--trial KEY`) runs twice in one command: directly (the training
loop `workers.training.loop.train` in a child process of its own, a torch.distributed group of one, torch's
default threads) and as a one-trial sweep (Ray Tune -> Ray Train TorchTrainer -> the same loop, tracked
in a throwaway MLflow store). The loop times itself in both (its reported `wall_s`), so the table splits
the sweep's extra time into a slower loop and everything around it (Ray start, worker start-up,
checkpoint persistence, MLflow logging).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DIRECT = "--direct-trial"   # argv of the child process that runs the loop directly


def one_trial_spec(spec, trial: dict) -> dict:
    """The spec as a dict restricted to `trial` (every list and search value fixed to the trial's)."""
    from pipelines.sweeps.spec import HYPERPARAMS

    data = spec.model_dump()
    data.update(experiment=f"{spec.experiment}-overhead", models=[trial["model"]], seeds=[trial["seed"]],
                methods=[trial["method"]], max_concurrent=1, scheduler={"type": "fifo"},
                datasets=[d for d in data["datasets"] if d["name"] == trial["dataset"]],
                search={p: trial[p] for p in HYPERPARAMS})
    return data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_direct(train_config: dict) -> dict:
    """The loop in a child process; returns its final metrics plus the process's wall time and threads."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pipelines.bench.overhead", DIRECT, json.dumps(train_config)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the direct run failed:\n{out.stderr[-4000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - start}


def _direct_child(train_config: str) -> None:
    import dataclasses

    import torch

    from workers.training.loop import TrainConfig, train

    cfg = json.loads(train_config)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    with tempfile.TemporaryDirectory(prefix="sparta-overhead-") as scratch:
        result = train(TrainConfig(**{k: v for k, v in cfg.items() if k in fields}), checkpoint_dir=scratch)
    final = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
    print(json.dumps({**final, "threads": torch.get_num_threads()}))


def run_in_ray(spec_dict: dict, spec_path: Path, workdir: Path) -> dict:
    from pipelines.sweeps.spec import SweepSpec
    from pipelines.sweeps.driver import run_sweep

    spec = SweepSpec.model_validate(spec_dict, context={"base_dir": spec_path.parent})
    start = time.perf_counter()
    out = run_sweep(spec, None, tracking_uri=f"sqlite:///{workdir}/mlflow.db", storage_root=workdir / "sweeps")
    wall = time.perf_counter() - start
    (rec,) = out.records.values()
    if rec.status != "FINISHED":
        raise RuntimeError(f"the trial failed in Ray: {rec.error}")
    return {**rec.final, "process_s": wall, "phases": sweep_phases(out.times, rec)}


# The sweep's wall time, piece by piece (they add up to it); "of which" rows lie inside the row above them.
PHASES = {
    "mlflow_and_ray_start": "MLflow parent run, Ray start",
    "tune_schedules": "Tune starts the trial",
    "startup": "start-up (direct: the process and its imports; sweep: Train controller, worker process and its "
               "imports, process group)",
    "loop": "the loop (`workers.training.loop.train`)",
    "ray_report": "  of which `ray.train.report` (Ray persisting the checkpoints before the last)",
    "after_loop": "after the loop: the last checkpoint persisted, Train and the trainable shut down",
    "mlflow_trial": "MLflow: the trial's run, metrics and adapter",
    "end": "end: summary, registry, parent run",
}


def sweep_phases(times: dict, rec) -> dict[str, float]:
    """Seconds per phase of a one-trial sweep from the driver's timestamps (SweepOutcome.times, the trial's
    TrialRecord: Tune's start, the loop's start as its worker reported it, Tune's end, MLflow's time)."""
    loop = rec.final["wall_s"]
    loop_end = rec.loop_started_at + loop
    return {
        "mlflow_and_ray_start": times["ray_ready"] - times["started"],
        "tune_schedules": rec.started_at - times["ray_ready"],
        "startup": rec.loop_started_at - rec.started_at,
        "loop": loop,
        "ray_report": rec.final.get("ray_report_s", 0.0),
        "after_loop": rec.ended_at - loop_end,
        "mlflow_trial": rec.logged_s,
        "end": times["finished"] - rec.ended_at - rec.logged_s,
    }


def bench(spec_path: Path, trial_key: str | None = None, out_dir: Path = Path("bench-results")) -> dict:
    from pipelines.sweeps.spec import load_spec

    spec = load_spec(spec_path)
    trials = spec.trials()
    keys = [t["trial_key"] for t in trials]
    if trial_key is not None and trial_key not in keys:
        raise ValueError(f"--trial {trial_key!r} is not a trial of {spec_path}; valid: {', '.join(keys)}")
    trial = trials[keys.index(trial_key)] if trial_key else trials[0]
    direct = run_direct(spec.trial_config(trial))
    with tempfile.TemporaryDirectory(prefix="sparta-overhead-") as tmp:
        ray = run_in_ray(one_trial_spec(spec, trial), Path(spec_path).resolve(), Path(tmp))
    metric = f"test_{direct.get('metric', 'accuracy')}"
    report = {
        "trial": trial["trial_key"], "steps": direct.get("step"),
        "direct": {"process_s": direct["process_s"], "loop_s": direct["wall_s"], metric: direct.get(metric),
                   "threads": direct["threads"]},
        "ray": {"process_s": ray["process_s"], "loop_s": ray["wall_s"], metric: ray.get(metric),
                "cpus_per_worker": spec.resources.cpus_per_worker},
    }
    report["ratios"] = {"loop": ray["wall_s"] / direct["wall_s"], "total": ray["process_s"] / direct["process_s"],
                        "outside_loop_s": ray["process_s"] - ray["wall_s"]}
    report["phases"] = ray["phases"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "overhead.json").write_text(json.dumps(report, indent=1))
    (out_dir / "overhead.md").write_text(markdown(report))
    return report


def markdown(r: dict) -> str:
    import pandas as pd

    from pipelines import tables

    d, y, q = r["direct"], r["ray"], r["ratios"]
    metric = next(k for k in d if k.startswith("test_"))
    rows = [[f"direct (`workers.training.loop.train`, {d['threads']} threads)", f"{d['process_s']:.1f}",
             f"{d['loop_s']:.1f}", f"{d['process_s'] - d['loop_s']:.1f}", f"{d[metric]:.4f}"],
            [f"one-trial sweep (Ray Tune + Train, {y['cpus_per_worker']:g} CPU per worker, "
             f"{max(1, round(y['cpus_per_worker']))} threads)", f"{y['process_s']:.1f}",
             f"{y['loop_s']:.1f}", f"{q['outside_loop_s']:.1f}", f"{y[metric]:.4f}"],
            ["ratio (sweep / direct)", f"{q['total']:.2f}x", f"{q['loop']:.2f}x", "", ""]]
    table = pd.DataFrame(rows, columns=["run", "wall s", "loop s", "outside the loop s", metric])
    text = f"Trial {r['trial']} ({r['steps']} steps)\n\n" + tables.markdown(table) + "\n"
    if r.get("phases"):
        text += "\nWhere the sweep's time goes (its phases add up to its wall time):\n\n" + \
            tables.markdown(phase_table(r)) + "\n"
    return text


def phase_table(r: dict):
    import pandas as pd

    p, d = r["phases"], r["direct"]
    direct = {"startup": d["process_s"] - d["loop_s"], "loop": d["loop_s"]}
    rows = [[PHASES[k], f"{direct[k]:.1f}" if k in direct else "", f"{v:.1f}"] for k, v in p.items()]
    total = sum(v for k, v in p.items() if not PHASES[k].startswith(" "))
    rows.append(["total", f"{d['process_s']:.1f}", f"{total:.1f}"])
    return pd.DataFrame(rows, columns=["phase", "direct s", "sweep s"])


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == DIRECT:
    _direct_child(sys.argv[2])

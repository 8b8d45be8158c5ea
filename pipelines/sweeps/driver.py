"""The sweep driver: Ray Tune over trials, each trial a Ray Train `TorchTrainer` running
`workers.training.trial.train_loop_per_worker`; MLflow (pipelines.sweeps.tracking) records everything from here.

Tune's trainable is a small function that builds and fits the TorchTrainer (Ray Train v2 runs inside a
Tune function trainable and reports through `TuneReportCallback`); it reserves almost no CPU itself, the
trial's workers hold the real resources. The driver's Tune callbacks collect every report, log each
finished trial as an MLflow child run with its adapter, and show live progress.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipelines.ray_local import start_ray
from workers.training.trial import LOOP_STARTED_KEY

STATE_FILE = "sparta_sweep.json"   # beside Tune's state: the spec, the MLflow parent run, the tracking URI
SPEC_COPY = "spec.yaml"            # the sweep's spec, kept in its storage: a resume (a later Ray Job) reads it there
TRAIN_GAVE_UP = "sparta_train_failed.txt"   # in a trial's Ray Train run folder: its run failed for good
DRIVER_CPU = 0.01                  # what a trial's Tune trainable holds besides its Ray Train workers


# -- the trial: Tune trainable -> TorchTrainer -----------------------------------------------------
def run_trial(config: dict) -> None:
    """Tune's trainable for one trial: fit a TorchTrainer whose workers run the training loop."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from workers.training.trial import train_loop_per_worker

    # Tune retries a trial whose trainable died (its node lost) or raised; one whose Ray Train run already
    # failed for good (Train's own retries spent) is not trained again: the retry fails at once, as it did.
    gave_up = Path(config["storage_path"]) / config["run_name"] / TRAIN_GAVE_UP
    if gave_up.is_file():
        raise RuntimeError(gave_up.read_text())
    res = config["resources"]
    gpus = res.get("gpus_per_worker", 0)
    cpus = res.get("cpus_per_worker", 1)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(config),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.get("workers_per_trial", 1), use_gpu=gpus > 0,
            resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})}),
        run_config=ray.train.RunConfig(
            name=config["run_name"], storage_path=config["storage_path"],
            failure_config=ray.train.FailureConfig(max_failures=config.get("max_failures", 1)),
            callbacks=[TuneReportCallback()]),
    )
    try:
        trainer.fit()
    except Exception as e:
        gave_up.parent.mkdir(parents=True, exist_ok=True)
        gave_up.write_text(f"{type(e).__name__}: {e}")
        raise


def worker_config(config: dict) -> dict:
    """What each Ray Train worker of a trial gets: its training config, and torch threads matching its CPU
    reservation (rounded: Ray's OMP_NUM_THREADS floors it, so 1.9 CPUs would train on one thread)."""
    from workers.training.trial import THREADS_KEY

    return {**config["train"], THREADS_KEY: max(1, round(config["resources"].get("cpus_per_worker", 1)))}


# -- the driver ------------------------------------------------------------------------------------
@dataclass
class TrialRecord:
    params: dict
    history: list[dict] = field(default_factory=list)
    status: str = "PENDING"
    checkpoint: str | None = None
    run_id: str | None = None
    error: str | None = None          # the last line of a failed trial's error
    # when things happened (epoch seconds, driver clock; the loop's start from its worker), for
    # `sparta bench overhead`: Tune started the trial, the loop began, reports arrived, Tune ended it;
    # and how long logging it to MLflow took
    started_at: float | None = None
    loop_started_at: float | None = None
    report_times: list[float] = field(default_factory=list)
    ended_at: float | None = None
    logged_s: float | None = None

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


REPORT_KEYS_DROPPED = ("checkpoint_path", LOOP_STARTED_KEY, "config", "trial_id", "experiment_id", "date", "timestamp", "pid",
                       "hostname", "node_ip", "time_this_iter_s", "time_total_s", "time_since_restore",
                       "iterations_since_restore", "training_iteration", "timesteps_total", "episodes_total",
                       "done", "should_checkpoint", "timesteps_since_restore")


def _metrics_of(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in REPORT_KEYS_DROPPED and isinstance(v, (int, float, str))}


def _error_line(error_file: str | None) -> str:
    """The gist of a failed trial's error file (Tune writes the whole trace): its last "...Error: ..."
    line, else its last line."""
    try:
        lines = [line.strip() for line in Path(error_file).read_text().splitlines() if line.strip()]
    except (OSError, TypeError):
        return "unknown error (no error file)"
    named = [i for i, line in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    if not named:
        return (lines or ["unknown error"])[-1][:2000]
    gist = lines[named[-1]]
    if gist.endswith(":"):   # Ray Train's "...WorkerGroupError: ...:" is followed by each rank's snippet
        gist += " " + next((line for line in lines[named[-1] + 1:] if not line.startswith("[")), "")
    return gist[:2000]


def _adapter_dir(checkpoint: str | None) -> Path | None:
    if not checkpoint:
        return None
    folder = Path(checkpoint)
    for candidate in (folder / "adapter", folder):
        if (candidate / "adapter_config.json").exists():
            return candidate
    return None


def with_checkpoint_history(history: list[dict], checkpoint: str | None) -> list[dict]:
    """A trial's reports completed from its last checkpoint, which records every evaluation of the run
    (`trainer_state.json`): a report in flight when a node or the driver died, or made before a resumed
    driver started, is missing from what this driver saw but not from the trainer's own record. Reports
    win where both have a step (they carry what the Ray wrapper adds: node, threads)."""
    try:
        recorded = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["history"]
    except (OSError, TypeError, ValueError, KeyError):
        return history
    by_step = {h["step"]: h for h in recorded if isinstance(h, dict) and "step" in h}
    by_step.update({h["step"]: h for h in history if "step" in h})
    return [by_step[k] for k in sorted(by_step)] + [h for h in history if "step" not in h]


def _flatten(config: dict) -> dict:
    return config["trial"] if "trial" in config else config


def _trainable():
    from ray import tune

    return tune.with_resources(lambda config: run_trial(_flatten(config)), {"cpu": DRIVER_CPU})


def tune_config(spec, **search):
    """Tune's settings: the spec's scheduler and concurrency, and `search` (search_alg, num_samples) from
    `pipelines.sweeps.search.tune_search`."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sched = spec.scheduler
    if sched.type == "asha":
        # time_attr counts reports (one per evaluation), the unit of grace_period and max_t in the spec;
        # "step" (optimizer steps) would stop every trial once its step count passed max_t evaluations.
        scheduler = ASHAScheduler(metric=sched.metric, mode=sched.mode, grace_period=sched.grace_period,
                                  reduction_factor=sched.reduction_factor, max_t=sched.max_t,
                                  time_attr="training_iteration")
    else:
        scheduler = FIFOScheduler()
    return tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=spec.max_concurrent, **search)


# Callbacks are pickled with Tune's experiment state, so they carry only a key into this registry of the
# live driver's objects (a resumed driver registers its own under the same key).
_DRIVERS: dict[str, tuple] = {}


def _callback(key: str):
    from ray.tune import Callback

    global SweepCallback
    if SweepCallback is None:
        class _SweepCallback(Callback):
            """Driver-side: collect every report, hand finished trials to MLflow, show progress. Pickled
            with Tune's state by reference (a module attribute) and holding only the registry key."""

            def __init__(self, key: str):
                self.key = key

            def _record(self, trial) -> TrialRecord:
                records = _DRIVERS[self.key][0]
                params = _flatten(trial.config)["params"]
                if params["trial_key"] not in records:
                    records[params["trial_key"]] = TrialRecord(dict(params))
                return records[params["trial_key"]]

            def _update(self):
                records, _, on_progress = _DRIVERS[self.key]
                on_progress(records)

            def on_trial_start(self, iteration, trials, trial, **info):
                rec = self._record(trial)
                rec.status = "RUNNING"
                rec.started_at = rec.started_at or time.time()
                self._update()

            def on_trial_result(self, iteration, trials, trial, result, **info):
                rec = self._record(trial)
                rec.report_times.append(time.time())
                rec.loop_started_at = rec.loop_started_at or result.get(LOOP_STARTED_KEY)
                rec.history.append(_metrics_of(result))
                rec.checkpoint = result.get("checkpoint_path") or rec.checkpoint
                self._update()

            def _done(self, trial, status: str):
                rec = self._record(trial)
                if not rec.history and getattr(trial, "last_result", None):
                    # Restored by a resumed sweep after it had finished in Tune's state but before the
                    # interrupted driver logged it: its results come back from that state, not from a report.
                    rec.history.append(_metrics_of(trial.last_result))
                    rec.checkpoint = trial.last_result.get("checkpoint_path") or rec.checkpoint
                rec.history = with_checkpoint_history(rec.history, rec.checkpoint)
                rec.status = status
                rec.ended_at = time.time()
                if rec.run_id is None:
                    _DRIVERS[self.key][1](rec)
                    rec.logged_s = time.time() - rec.ended_at
                self._update()

            def on_trial_complete(self, iteration, trials, trial, **info):
                self._done(trial, "FINISHED")

            def on_trial_error(self, iteration, trials, trial, **info):
                self._record(trial).error = _error_line(trial.error_file)
                self._done(trial, "FAILED")

        _SweepCallback.__qualname__ = _SweepCallback.__name__ = "SweepCallback"
        SweepCallback = _SweepCallback
    return SweepCallback(key)


SweepCallback = None   # the Tune callback class, made on first use (so importing this module needs no Ray)


@dataclass
class SweepOutcome:
    experiment: str
    parent_run_id: str
    storage: Path
    records: dict[str, TrialRecord]
    summary: object                  # pandas DataFrame (pipelines.sweeps.summary.summary_table)
    registered: list
    wall_s: float
    pareto: object = None             # pandas DataFrame (pipelines.sweeps.pareto.pareto_table) with objectives
    # epoch seconds: run_sweep called, Ray ready, Tune's fit returned, the sweep's MLflow run finished
    times: dict = field(default_factory=dict)


def sweep_storage(experiment: str, root: str | os.PathLike | None = None) -> Path:
    """Where an experiment's sweeps keep Tune's state and trial checkpoints: <root or ./sweeps>/<experiment>,
    one folder per sweep, the latest named in its state file."""
    return (Path(root) if root else Path("sweeps")).resolve() / experiment


def keep_spec(spec, dest: Path) -> None:
    """Keep the parsed sweep spec beside its state, as YAML (its paths already absolute: it loads the same
    from any folder)."""
    import yaml

    dest.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))


def run_sweep(spec, spec_path: str | os.PathLike | None = None, *, tracking_uri: str | None = None,
              storage_root: str | os.PathLike | None = None, address: str | None = None, resume: bool = False,
              on_progress: Callable[[dict[str, TrialRecord]], None] = lambda records: None,
              _fault: dict | None = None) -> SweepOutcome:
    """Run (or, with resume=True, continue) the sweep `spec` on Ray; everything lands in MLflow.
    `_fault`: test-only fault injection passed to the trials' workers."""
    from ray import tune

    from pipelines.sweeps.search import tune_search
    from pipelines.sweeps.tracking import SweepTracker

    t0 = time.time()
    home = sweep_storage(spec.experiment, storage_root)
    state_file = home / STATE_FILE   # the experiment's latest sweep; each sweep has its own folder
    tracker = SweepTracker(spec.experiment, tracking_uri)
    records: dict[str, TrialRecord] = {}
    if resume:
        if not state_file.exists():
            raise FileNotFoundError(f"no sweep to resume at {home} (missing {STATE_FILE})")
        state = json.loads(state_file.read_text())
        storage = Path(state["storage"])
        kept_spec = state.get("spec")
        for gave_up in storage.glob(f"trials/*/{TRAIN_GAVE_UP}"):   # a resume gives failed trials another go
            gave_up.unlink()
        tracker.reopen(state["parent_run_id"])
        for trial in tracker.trials:   # logged before the interruption: never redone
            rec = TrialRecord(trial["params"], [trial["final"]], trial.get("status", "FINISHED"),
                              run_id=trial.get("run_id"))
            records[rec.params["trial_key"]] = rec
    else:
        storage = home / time.strftime("%Y%m%d-%H%M%S")
        storage.mkdir(parents=True, exist_ok=True)
        tracker.start(spec_path, spec.model_dump(mode="json"))
        # the spec goes with the sweep's state: a Ray Job's copy of the submitted file is gone when it ends
        kept_spec = str(storage / SPEC_COPY)
        keep_spec(spec, Path(kept_spec))
    state_file.write_text(json.dumps({"experiment": spec.experiment, "parent_run_id": tracker.parent_run_id,
                                      "storage": str(storage),
                                      "tracking_uri": tracker.tracking_uri,
                                      "spec": kept_spec}))

    def on_finished(rec: TrialRecord) -> None:
        rec.run_id = tracker.log_trial(rec.params, rec.history, rec.final, _adapter_dir(rec.checkpoint),
                                       status=rec.status, error=rec.error)

    key = str(storage)
    _DRIVERS[key] = (records, on_finished, on_progress)
    times = {"started": t0}
    with tracker:
        start_ray(address, dashboard=True)   # the dashboard: Ray Jobs and the user's view
        times["ray_ready"] = time.time()
        callback = _callback(key)   # also defines the class the pickled state refers to
        if resume:
            tuner = tune.Tuner.restore(str(storage / "tune"), trainable=_trainable(), resume_unfinished=True,
                                       resume_errored=True)
        else:
            space, search = tune_search(spec, storage, _fault)
            # Tune's failure_config restarts a trial whose trainable died with its node (Train's own
            # FailureConfig covers its workers only); the new TorchTrainer, same name and storage, goes on
            # from the last checkpoint Ray Train recorded there.
            tuner = tune.Tuner(_trainable(), param_space=space, tune_config=tune_config(spec, **search),
                               run_config=tune.RunConfig(name="tune", storage_path=str(storage), verbose=0,
                                                         failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                                         callbacks=[callback]))
        tuner.fit()
        times["fit_done"] = time.time()
        trials = [{"params": r.params, "history": r.history, "final": r.final, "status": r.status,
                   "run_id": r.run_id} for r in records.values()]
        result = tracker.finish(trials, objectives=[(o.metric, o.mode) for o in spec.objectives or []])
    _DRIVERS.pop(key, None)
    times["finished"] = time.time()
    return SweepOutcome(spec.experiment, tracker.parent_run_id, storage, records, result.summary,
                        result.registered, times["finished"] - t0, result.pareto, times)

"""Sweeps end to end on a local Ray: real Ray Tune and Train, real DeepSpeed, real MLflow (sqlite)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipelines.sweeps.spec import load_spec
from pipelines.sweeps.driver import run_sweep
from pipelines.sweeps.registry import load_registered

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "examples" / "sweep-tiny.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_ray_for_the_module():
    # The first sweep starts Ray on loopback and the others join it: a Ray start costs ~35 s of CPU
    # on a small machine (GCS, raylet, dashboard, log monitor). Each sweep has its own storage and store.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        yield
        import ray

        if ray.is_initialized():
            ray.shutdown()


def spec_file(tmp_path, **changes) -> Path:
    spec = yaml.safe_load(TINY.read_text())
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def child_runs(uri, experiment):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`sparta.role` = 'trial'")
    return client, runs


def test_tiny_sweep_end_to_end(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = spec_file(tmp_path)
    spec = load_spec(path)
    out = run_sweep(spec, path, tracking_uri=uri, storage_root=tmp_path / "sweeps")
    assert sorted(out.records) == sorted(t["trial_key"] for t in spec.trials())
    assert all(r.status == "FINISHED" and [h["step"] for h in r.history] == [2, 4] for r in out.records.values())
    # the timeline `sparta bench overhead` reads: in order, on one clock
    t = out.times
    assert t["started"] < t["ray_ready"] < t["fit_done"] <= t["finished"]
    for r in out.records.values():
        assert t["ray_ready"] < r.started_at < r.loop_started_at < r.report_times[0] < r.report_times[1] < r.ended_at
        assert r.ended_at + r.logged_s <= t["fit_done"] and r.logged_s > 0
        assert 0 < r.final["ray_report_s"] < r.final["wall_s"]   # the step-2 report's, inside the loop
        assert "loop_started_at" not in r.final   # a timestamp, not a metric
    client, runs = child_runs(uri, spec.experiment)
    assert len(runs) == 4
    for run in runs:   # params, per-step metrics and the adapter of every trial
        assert run.data.tags["mlflow.parentRunId"] == out.parent_run_id
        assert {"method", "seed", "lr", "rank"} <= set(run.data.params)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert steps == [2, 4]
        for key in ("train_loss", "val_accuracy", "test_accuracy", "gen_gap", "samples_per_s", "wall_s",
                    "peak_mem_mib", "trainable_params"):
            assert key in run.data.metrics, key
        assert run.data.metrics["torch_threads"] == 1   # 0.45 CPUs reserved: one thread
        files = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
        assert "adapter/adapter_model.safetensors" in files
        assert "adapter/peft" in files   # the PEFT export the trainer writes beside it
    # the summary: one row per method, its numbers those of the child runs
    table = out.summary.set_index("method")
    assert sorted(table.index) == ["cla", "lora"] and (table["n_seeds"] == 2).all()
    for method in ("cla", "lora"):
        finals = [r.data.metrics["final/test_accuracy"] for r in runs if r.data.params["method"] == method]
        assert table.loc[method, "test_mean"] == pytest.approx(sum(finals) / 2)
    parent_files = {f.path for f in client.list_artifacts(out.parent_run_id, "summary")}
    assert {"summary/summary.csv", "summary/summary.parquet", "summary/summary.md"} <= parent_files
    # the best adapter is registered and loads onto its base model
    (reg,) = out.registered
    best = table["val_mean"].idxmax()
    assert reg.model == "minilm-l6" and reg.method in ("cla", "lora")
    assert table.loc[reg.method, "val_mean"] == table.loc[best, "val_mean"]
    model, tok = load_registered(reg.uri, uri)
    from workers.data.assets import load_model

    base, _ = load_model("minilm-l6", task="classification", num_labels=2)
    batch = tok(["a lovely stay, friendly staff"], return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, base(**batch).logits)


def test_a_killed_worker_restarts_from_its_checkpoint(tmp_path):
    # Two workers under ZeRO-2: each holds half of the optimizer state, so the checkpoint must carry both.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = spec_file(tmp_path, methods=["cla"], seeds=[0], experiment="sweep-fault",
                     train={"steps": 6, "batch_size": 4, "max_length": 64, "eval_every": 2, "eval_examples": 8,
                            "precision": "fp32"},   # DeepSpeed names bf16 partitions bf16_zero_pp_rank_*
                     resources={"workers_per_trial": 2, "cpus_per_worker": 0.5}, deepspeed={"zero_stage": 2})
    spec = load_spec(path)
    marker = tmp_path / "crashed.json"
    out = run_sweep(spec, path, tracking_uri=uri, storage_root=tmp_path / "sweeps",
                    _fault={"_crash_at_step": 4, "_crash_marker": str(marker)})
    crash = json.loads(marker.read_text())   # a worker process did die at step 4 ...
    assert crash["step"] == 4
    (rec,) = out.records.values()
    assert rec.status == "FINISHED"
    steps = [h["step"] for h in rec.history]
    # ... and its trial went on from the step-4 checkpoint: step 6 reported, step 2 never redone
    assert steps[-1] == 6 and steps.count(2) == 1 and 4 in steps
    # the checkpoint Ray kept merges both ranks' folders: both ZeRO partitions, both RNG states
    files = {p.name for p in Path(rec.checkpoint).rglob("*")}
    assert {"rng-rank0.json", "rng-rank1.json", "adapter_model.safetensors", "trainer_state.json"} <= files
    assert {f for f in files if f.startswith("zero_pp_rank_")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    _, runs = child_runs(uri, "sweep-fault")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["resources.workers_per_trial"] == "2"


def test_resume_after_interrupting_the_driver_redoes_no_finished_trial(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = spec_file(tmp_path, experiment="sweep-resume", max_concurrent=2)   # 4 trials, two at a time
    spec = load_spec(path)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "sweep", "run", str(path), "--tracking-uri", uri,
                               "--storage", str(tmp_path / "sweeps")], cwd=ROOT, env={**env, "COLUMNS": "400"},
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        finished = []
        while time.time() < deadline and not finished:
            time.sleep(2)
            try:
                _, runs = child_runs(uri, "sweep-resume")
            except Exception:   # the store or the experiment does not exist yet
                continue
            finished = [r for r in runs if r.info.status == "FINISHED"]
        assert finished, "no trial finished in time"
        driver.send_signal(signal.SIGINT)   # interrupt the driver mid-sweep
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    # the CLI says so, and how to go on, rather than "done"
    said = " ".join((tmp_path / "driver.log").read_text().split())
    assert driver.returncode == 130, said[-2000:]
    assert "interrupted after" in said and "`sparta sweep resume sweep-resume` runs them" in said
    assert "done in" not in said
    _, before = child_runs(uri, "sweep-resume")
    done_before = {r.data.tags["trial_key"]: r.info.run_id for r in before if r.info.status == "FINISHED"}
    assert 0 < len(done_before) < len(spec.trials())
    out = run_sweep(spec, path, tracking_uri=uri, storage_root=tmp_path / "sweeps", resume=True)
    _, after = child_runs(uri, "sweep-resume")
    finished_after = [r for r in after if r.info.status == "FINISHED"]
    keys = [r.data.tags["trial_key"] for r in finished_after]
    assert sorted(keys) == sorted(t["trial_key"] for t in spec.trials())   # every trial accounted for, once
    for key, run_id in done_before.items():   # finished trials kept their run: not redone
        assert [r.info.run_id for r in finished_after if r.data.tags["trial_key"] == key] == [run_id]
    assert all(r.final.get("test_accuracy") is not None for r in out.records.values())   # every trial's results
    assert sorted(out.summary["method"]) == ["cla", "lora"] and (out.summary["n_seeds"] == 2).all()


def test_a_trial_that_keeps_failing_is_recorded_as_failed_with_its_error(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = spec_file(tmp_path, methods=["cla"], seeds=[0], experiment="sweep-failing", max_failures=0,
                     train={"steps": 4, "batch_size": 4, "max_length": 32, "eval_every": 2, "eval_examples": 4})
    out = run_sweep(load_spec(path), path, tracking_uri=uri, storage_root=tmp_path / "sweeps",
                    _fault={"_crash_at_step": 2, "_crash_marker": str(tmp_path / "crashed.json")})
    (rec,) = out.records.values()
    assert rec.status == "FAILED" and rec.error   # no retries left: the crash is final
    client, runs = child_runs(uri, "sweep-failing")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["sparta.error"] == rec.error
    (parent,) = client.search_runs([runs[0].info.experiment_id], "tags.`sparta.role` = 'sweep'")
    assert parent.data.metrics["failed_trials"] == 1 and not out.registered


def test_a_trial_whose_training_failed_for_good_is_not_trained_again_by_tunes_retry(tmp_path):
    from pipelines.sweeps.driver import TRAIN_GAVE_UP

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = spec_file(tmp_path, methods=["cla"], seeds=[0], experiment="sweep-gave-up", max_failures=1,
                     train={"steps": 6, "batch_size": 4, "max_length": 32, "eval_every": 2, "eval_examples": 4})
    # the crash marker's folder does not exist: every attempt raises at its first report (after its checkpoint)
    out = run_sweep(load_spec(path), path, tracking_uri=uri, storage_root=tmp_path / "sweeps",
                    _fault={"_crash_at_step": 2, "_crash_marker": str(tmp_path / "missing" / "crashed.json")})
    (rec,) = out.records.values()
    assert rec.status == "FAILED" and "crashed.json" in rec.error, rec.error
    (run,) = (tmp_path / "sweeps").glob("sweep-gave-up/*/trials/trial-*")
    assert "FileNotFoundError" in (run / TRAIN_GAVE_UP).read_text()
    # Ray Train's two attempts (max_failures 1) made one checkpoint each (step 2, then 4 resumed from it);
    # Tune's retry of the trial (max_failures 1 too) trained nothing: no step-6 checkpoint, no third attempt
    steps = sorted(json.loads(f.read_text())["step"] for f in run.glob("checkpoint_*/trainer_state.json"))
    assert steps == [2, 4]
    _, runs = child_runs(uri, "sweep-gave-up")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_asha_stops_weak_trials_early_and_lets_the_best_run_every_evaluation(tmp_path):
    # Four learning rates, six evaluations each, two trials at a time in grid order: the first (the one that
    # learns) is above every rung's cutoff, so it runs to the end, and the near-zero rates that start later
    # fall below the cutoffs the first two set. grace_period and max_t count evaluations; ASHA measured in
    # optimizer steps would stop every trial at step max_t.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # A table of its own, easy enough that 3e-3 learns within a few evaluations whatever the built-in tasks are.
    words = {"yes": ["lovely", "wonderful", "great", "superb"], "no": ["awful", "terrible", "bad", "dreadful"]}
    table = tmp_path / "stays.csv"
    table.write_text("body,verdict\n" + "".join(f"the stay was {words[label][i % 4]} and the room {i},{label}\n"
                                                for i in range(200) for label in words))
    path = spec_file(tmp_path, experiment="sweep-asha", methods=["lora"], seeds=[0], max_concurrent=2,
                     datasets=[{"path": str(table), "text": "body", "label": "verdict"}],
                     search={"lr": [3e-3, 1e-6, 1e-7, 1e-8], "rank": 8},
                     train={"steps": 12, "batch_size": 8, "max_length": 64, "eval_every": 2, "eval_examples": 24},
                     scheduler={"type": "asha", "metric": "val_loss", "mode": "min", "grace_period": 1,
                                "reduction_factor": 2})
    spec = load_spec(path)
    assert spec.scheduler.max_t == 6 and len(spec.trials()) == 4
    out = run_sweep(spec, path, tracking_uri=uri, storage_root=tmp_path / "sweeps")
    evaluations = {r.params["lr"]: len(r.history) for r in out.records.values()}
    last_loss = {r.params["lr"]: r.history[-1]["val_loss"] for r in out.records.values()}
    best = min(last_loss, key=last_loss.get)
    print("evaluations per lr:", evaluations, "last val_loss:", last_loss)
    assert all(r.status == "FINISHED" for r in out.records.values())   # stopped early is not failed
    assert evaluations[best] == 6, evaluations
    assert min(evaluations.values()) < 6, evaluations
    assert [h["step"] for h in next(r for r in out.records.values() if r.params["lr"] == best).history] == \
        [2, 4, 6, 8, 10, 12]


def test_an_optuna_sweep_over_two_objectives_runs_end_to_end(tmp_path):
    """Optuna (TPE through ray.tune.search.optuna) picks each trial's values, ASHA may stop them; every trial
    lands in MLflow with its values and results; the draws are the seed's; the Pareto front over the two
    objectives is written."""
    from pipelines.sweeps.pareto import pareto_mask
    from pipelines.sweeps.search import CellSearch

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = spec_file(tmp_path, experiment="sweep-optuna", methods=["lora"], seeds=[0], max_concurrent=3,
                     search={"algorithm": "optuna", "lr": {"loguniform": [1e-4, 1e-2]}, "rank": [4, 8],
                             "num_samples": 3, "seed": 11},
                     objectives=[{"metric": "val_accuracy", "mode": "max"}, {"metric": "peak_mem_mib", "mode": "min"}],
                     scheduler={"type": "asha", "metric": "val_loss", "mode": "min", "grace_period": 1,
                                "reduction_factor": 2})
    spec = load_spec(path)
    out = run_sweep(spec, path, tracking_uri=uri, storage_root=tmp_path / "sweeps")
    # the seed's draws: TPE's first trials are its seeded startup draws, whatever the results
    fresh = CellSearch(spec, tmp_path)
    want = {fresh.suggest(f"x{i}")["trial"]["params"]["trial_key"] for i in range(3)}
    assert set(out.records) == want
    assert all(r.status == "FINISHED" and 1 <= len(r.history) <= 2 for r in out.records.values())
    client, runs = child_runs(uri, spec.experiment)
    assert len(runs) == 3
    for run in runs:
        p = run.data.params
        assert p["search.algorithm"] == "optuna" and 1e-4 <= float(p["lr"]) <= 1e-2 and p["rank"] in ("4", "8")
        assert p["trial_key"] in want and out.records[p["trial_key"]].params["lr"] == float(p["lr"])
        assert {"final/val_accuracy", "final/peak_mem_mib"} <= set(run.data.metrics)
    front = out.pareto
    assert len(front) == 3
    finals = {r.params["trial_key"]: r.final for r in out.records.values()}
    points = np.array([[finals[k]["val_accuracy"], finals[k]["peak_mem_mib"]] for k in front["trial_key"]])
    assert front["pareto"].tolist() == pareto_mask(points, ["max", "min"]).tolist() and front["pareto"].any()
    files = {f.path for f in client.list_artifacts(out.parent_run_id, "summary")}
    assert {"summary/pareto.csv", "summary/pareto.md", "summary/pareto.png"} <= files


def test_a_gpt2_folder_goes_from_sweep_to_registry_to_serving(tmp_path):
    # GPT-2's head class is GPT2LMHeadModel (no "ForCausalLM"): one rule (workers.data.assets.model_kind)
    # must call it a causal LM in the spec, the loop, the registry and serving alike.
    import transformers as tf

    from pipelines.serving.deploy import engine_config, resolve_model
    from pipelines.serving.spec import ServeSpec
    from workers.data.assets import resolve_model_path, tiny_config
    from workers.serving.engine import Engine, EngineConfig, Job
    from workers.serving.artifacts import with_local_adapters

    folder = tmp_path / "tiny-gpt2"
    tok = tf.AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))   # a real tokenizer for the folder
    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tiny_config("gpt2", vocab_size=len(tok), max_position_embeddings=256)).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = spec_file(tmp_path, experiment="sweep-gpt2", models=[str(folder)], methods=["lora"], seeds=[0],
                     train={"steps": 2, "batch_size": 4, "max_length": 96, "eval_every": 2, "eval_examples": 4})
    spec = load_spec(path)
    assert spec.framing(str(folder)) == "generation"
    out = run_sweep(spec, path, tracking_uri=uri, storage_root=tmp_path / "sweeps")
    (reg,) = out.registered
    serve = ServeSpec.model_validate({"model": reg.uri, "tracking_uri": uri, "max_context": 128,
                                      "max_new_tokens": 8, "dtype": "float32"})
    resolved = resolve_model(serve)   # refused before: "adapts ... for classification"
    assert resolved.model == str(folder) and Path(resolved.adapter, "adapter_config.json").is_file()
    engine = Engine(EngineConfig(**with_local_adapters(engine_config(serve, resolved), tmp_path / "replica-cache")))
    [done] = engine.run([Job(engine.codec.encode("The hotel was"), 4)])
    assert done.completion_tokens == 4 or done.finish_reason == "stop"

"""pipelines.sweeps.tracking and pipelines.sweeps.summary on a real MLflow sqlite store in tmp_path: a fake but
realistic sweep (2 methods x 2 seeds and a failed trial) with real saved adapters."""
from __future__ import annotations

import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

import adapters
from adapters import AdapterConfig
from pipelines.sweeps import summary as summ
from pipelines import mlflow_store as store
from pipelines.sweeps import registry
from pipelines.sweeps import tracking
from workers.data.assets import load_model
from tests.helpers import free_port
from tests.helpers import markdown_rows

REPO = Path(__file__).resolve().parents[3]
EXPERIMENT = "sparta-test"
MODEL, DATASET = "random:llama-tiny", "movie-reviews"
OVERRIDES = {"max_position_embeddings": 256}
# (method, seed) -> final (val accuracy, test accuracy, val loss). cla wins on mean val (0.77 vs 0.72);
# within cla, seed 1 has the better val accuracy, so a registry that took the first seed would fail.
FINALS = {("lora", 0): (0.70, 0.68, 0.61), ("lora", 1): (0.74, 0.71, 0.57),
          ("cla", 0): (0.76, 0.75, 0.52), ("cla", 1): (0.78, 0.73, 0.50)}
TRAINABLE = {"lora": 1024, "cla": 512}
STEPS = (10, 20, 30)


def tiny_base():
    model, _ = load_model(MODEL, task="causal_lm", **OVERRIDES)
    return model.eval()


def make_adapter(method: str, seed: int, folder: Path) -> Path:
    model = tiny_base()
    handle = adapters.apply(model, AdapterConfig(method=method, rank=4, seed=seed))
    gen = torch.Generator().manual_seed(100 * seed + len(method))
    with torch.no_grad():   # as if trained: B = 0 at start would make every adapter a no-op
        for p in handle.adapter_parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return handle.save(folder)


def _history(method: str, seed: int) -> list[dict]:
    val, test, val_loss = FINALS[(method, seed)]
    evals = []
    for i, step in enumerate(STEPS):
        lag = (len(STEPS) - 1 - i) * 0.05   # metrics improve towards the final eval
        evals.append({"step": step, "epoch": (i + 1) / len(STEPS), "train_loss": 1.0 - 0.1 * i + 0.01 * seed,
                      "val_loss": val_loss + lag, "val_accuracy": val - lag, "test_loss": val_loss + lag + 0.02,
                      "test_accuracy": test - lag, "metric": "accuracy", "gen_gap": 0.1 - 0.01 * i,
                      "samples_per_s": 100.0 + 7 * seed + (13 if method == "cla" else 0) + i,
                      "wall_s": 4.0 * (i + 1) + seed + (0.5 if method == "lora" else 0.0),
                      "peak_mem_mib": 300.0 + (20 if method == "lora" else 0) + seed,
                      "trainable_params": TRAINABLE[method]})
    return evals


def trial_params(method: str, seed: int) -> dict:
    return {"model": MODEL, "dataset": DATASET, "method": method, "seed": seed, "lr": 1e-3, "rank": 4,
            "alpha": 8.0, "chain_segments": 1, "lora_plus_ratio": 16.0, "weight_decay": 0.0,
            "trial_key": f"{method}-s{seed}", "train": {"epochs": 3, "batch_size": 8},
            "model_overrides": dict(OVERRIDES)}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    spec = {"name": "unit", "models": [MODEL], "datasets": [DATASET], "methods": ["lora", "cla"],
            "seeds": [0, 1], "search": {"lr": [1e-3]}}
    spec_path = root / "sweep.yaml"
    spec_path.write_text("name: unit\nmodels: [random:llama-tiny]\nmethods: [lora, cla]\nseeds: [0, 1]\n")
    trials = []
    for (method, seed) in FINALS:
        history = _history(method, seed)
        trials.append({"params": trial_params(method, seed), "history": history, "final": dict(history[-1]),
                       "status": "FINISHED",
                       "adapter_dir": make_adapter(method, seed, root / "adapters" / f"{method}-s{seed}")})
    failed = _history("lora", 0)[:1]   # died after its first eval, no adapter
    trials.append({"params": trial_params("lora", 2), "history": failed, "final": {}, "status": "ERROR",
                   "adapter_dir": None})
    tracker = tracking.SweepTracker(EXPERIMENT, uri)
    with tracker:
        parent = tracker.start(spec_path, spec)
        run_ids = [tracker.log_trial(t["params"], t["history"], t["final"], t["adapter_dir"], t["status"])
                   for t in trials]
        result = tracker.finish()
    return {"uri": uri, "root": root, "trials": trials, "run_ids": run_ids, "parent": parent,
            "result": result, "client": MlflowClient(uri), "spec_path": spec_path}


# -- store set-up ----------------------------------------------------------------------------------
def test_defaults_and_setup(tmp_path, monkeypatch):
    assert store.tracking_uri_default() == "sqlite:///mlruns/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # The relative default is pinned to the working directory at resolution time.
    assert store.resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert store.artifact_root() == tmp_path.resolve() / "mlruns" / "artifacts"
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    exp_id = store.ensure_experiment(uri, "exp one")
    assert store.ensure_experiment(uri, "exp one") == exp_id                       # idempotent
    exp = MlflowClient(uri).get_experiment(exp_id)
    assert exp.artifact_location == (tmp_path / "store" / "artifacts" / "exp-one").resolve().as_uri()
    MlflowClient(uri).delete_experiment(exp_id)
    assert store.ensure_experiment(uri, "exp one") == exp_id                       # restored, not a new id
    assert MlflowClient(uri).get_experiment(exp_id).lifecycle_stage == "active"


# -- runs ------------------------------------------------------------------------------------------
def test_parent_run(sweep):
    client, parent = sweep["client"], sweep["parent"]
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.tags["sparta.role"] == "sweep"
    assert run.data.tags["sparta.version"] == store.sparta_version() != "unknown"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.params["search.lr"] == "[0.001]" and run.data.params["seeds"] == "[0, 1]"
    spec = {a.path for a in client.list_artifacts(parent, "spec")}
    assert spec == {"spec/sweep.yaml", "spec/spec.resolved.yaml"}
    got = Path(client.download_artifacts(parent, "spec/sweep.yaml", str(sweep["root"] / "dl-spec")))
    assert got.read_text() == sweep["spec_path"].read_text()
    m = run.data.metrics
    assert (m["trials"], m["failed_trials"], m["finished_trials"]) == (5, 1, 4)
    assert m["trial_wall_s_total"] == pytest.approx(sum(t["final"]["wall_s"] for t in sweep["trials"][:4]))
    assert m["sweep_wall_s"] > 0
    assert m["trials_per_min"] == pytest.approx(5 / (m["sweep_wall_s"] / 60), rel=1e-6)
    # this process was the driver: its peak RSS then (torch and MLflow imported), no more than its peak now
    from pipelines.sweeps.tracking import driver_peak_rss_mib

    assert 100 <= m["driver_peak_rss_mib"] <= driver_peak_rss_mib()


def test_child_runs(sweep):
    client, parent = sweep["client"], sweep["parent"]
    exp = client.get_experiment_by_name(EXPERIMENT)
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_id for r in children) == sorted(sweep["run_ids"])
    for trial, run_id in zip(sweep["trials"], sweep["run_ids"]):
        run = client.get_run(run_id)
        p = trial["params"]
        assert run.data.tags["mlflow.parentRunId"] == parent
        for key in ("method", "model", "dataset", "seed", "trial_key"):
            assert run.data.tags[key] == str(p[key])
        assert run.info.run_name == p["trial_key"]
        assert run.info.status == ("FAILED" if trial["status"] == "ERROR" else "FINISHED")
        # every param, nested train settings flattened, values as JSON unless strings
        expected = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in p.items() if not isinstance(v, dict)}
        expected.update({f"train.{k}": json.dumps(v) for k, v in p["train"].items()})
        expected.update({f"model_overrides.{k}": json.dumps(v) for k, v in p["model_overrides"].items()})
        assert run.data.params == expected
        # every metric of every eval at its step
        numeric = [k for k in trial["history"][0] if k not in ("step", "metric")]
        for key in numeric:
            got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            assert got == [(ev["step"], float(ev[key])) for ev in trial["history"]], key
        finals = {k[len("final/"):]: v for k, v in run.data.metrics.items() if k.startswith("final/")}
        assert finals == {k: float(v) for k, v in trial["final"].items() if k not in ("step", "metric")}
        if trial["final"]:
            assert run.data.tags["sparta.metric"] == "accuracy"
        # the adapter folder, byte for byte
        listed = {a.path for a in client.list_artifacts(run_id, "adapter")}
        if trial["adapter_dir"] is None:
            assert listed == set()
            continue
        assert listed == {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"}
        got = Path(client.download_artifacts(run_id, "adapter", str(sweep["root"] / "dl" / run_id)))
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (got / name).read_bytes() == (Path(trial["adapter_dir"]) / name).read_bytes()


def test_exceptions_close_runs(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    tracker = tracking.SweepTracker("broken", uri)
    with pytest.raises(Exception, match="bad key"):
        with tracker:
            parent = tracker.start(spec_dict={"name": "x"})
            # MLflow refuses this param name mid-run: the child must still be closed, as FAILED.
            tracker.log_trial({"model": MODEL, "dataset": DATASET, "method": "lora", "seed": 0,
                               "trial_key": "t", "bad key!?": 1}, [], {})
    children = client.search_runs([client.get_experiment_by_name("broken").experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.status for r in children] == ["FAILED"]
    run = client.get_run(parent)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert "bad key" in run.data.tags["sparta.error"]
    with pytest.raises(RuntimeError, match="start"):
        tracker.log_trial({}, [], {})
    with pytest.raises(ValueError, match="unknown trial status"):
        t2 = tracking.SweepTracker("broken", uri)
        with t2:
            t2.start()
            t2.log_trial({"model": "m", "dataset": "d", "method": "lora", "seed": 0}, [], {}, status="DONE?")
    assert client.get_run(t2.parent_run_id).info.status == "FAILED"


def test_an_interrupted_sweep_ends_killed_with_the_trials_that_ended(tmp_path):
    """Ctrl-C: Tune saves its state and returns with trials still RUNNING or PENDING; they are not summarised
    (nor counted as failed) and the sweep's run ends KILLED, to be resumed."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = tracking.SweepTracker("interrupted", uri, register=False)
    with tracker:
        tracker.start()
        tracker.log_trial(trial_params("cla", 0), _history("cla", 0), _history("cla", 0)[-1], status="TERMINATED")
        mine = [{"params": trial_params("cla", 0), "final": _history("cla", 0)[-1], "status": "TERMINATED"},
                {"params": trial_params("cla", 1), "final": {}, "status": "RUNNING"},
                {"params": trial_params("lora", 0), "final": {}, "status": "PENDING"}]
        result = tracker.finish(mine)
    run = MlflowClient(uri).get_run(result.parent_run_id)
    assert run.info.status == "KILLED"
    assert (run.data.metrics["trials"], run.data.metrics["failed_trials"]) == (1, 0)
    assert list(result.summary["method"]) == ["cla"] and list(result.summary["n_seeds"]) == [1]


def test_finish_with_the_drivers_trials(tmp_path):
    # The driver may hand finish() its own list (Ray's statuses, no run ids): matched by trial_key.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = tracking.SweepTracker("driver", uri, register=False)
    with tracker:
        tracker.start()
        ids = [tracker.log_trial(trial_params("cla", s), _history("cla", s), _history("cla", s)[-1], status="TERMINATED")
               for s in (0, 1)]
        mine = [{"params": trial_params("cla", s), "final": _history("cla", s)[-1], "status": "TERMINATED"}
                for s in (0, 1)]
        result = tracker.finish(mine)
    client = MlflowClient(uri)
    assert [client.get_run(i).info.status for i in ids] == ["FINISHED", "FINISHED"]
    m = client.get_run(result.parent_run_id).data.metrics
    assert (m["trials"], m["failed_trials"]) == (2, 0)
    assert result.registered == [] and client.search_registered_models() == []
    assert list(result.summary["n_seeds"]) == [2]
    dl = Path(client.download_artifacts(result.parent_run_id, "summary/trials.csv", str(tmp_path / "dl")))
    assert pd.read_csv(dl)["run_id"].tolist() == ids


# -- the summary -----------------------------------------------------------------------------------
def _by_hand(method: str) -> dict:
    runs = [(seed, FINALS[(method, seed)]) for seed in (0, 1)]
    hist = [_history(method, seed)[-1] for seed in (0, 1)]
    return {"n_seeds": 2,
            "test_mean": statistics.mean(r[1][1] for r in runs), "test_std": statistics.stdev(r[1][1] for r in runs),
            "val_mean": statistics.mean(r[1][0] for r in runs), "val_std": statistics.stdev(r[1][0] for r in runs),
            "val_loss_mean": statistics.mean(r[1][2] for r in runs),
            "wall_s_mean": statistics.mean(h["wall_s"] for h in hist),
            "samples_per_s_mean": statistics.mean(h["samples_per_s"] for h in hist),
            "peak_mem_mib_mean": statistics.mean(h["peak_mem_mib"] for h in hist),
            "trainable_params": TRAINABLE[method]}


def test_summary_numbers(sweep):
    df = summ.summary_table(sweep["trials"])
    assert list(df["method"]) == ["cla", "lora"]            # best test mean first
    for _, row in df.iterrows():
        want = _by_hand(row["method"])
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-12, abs=1e-15), (row["method"], key)
        assert row["metric"] == "accuracy" and (row["model"], row["dataset"]) == (MODEL, DATASET)
    assert dict(zip(df["method"], df["n_failed"])) == {"cla": 0, "lora": 1}
    assert list(df["n_configs"]) == [1, 1] and list(df["lr"]) == [1e-3, 1e-3]
    assert df is not None and sweep["result"].summary.equals(df)


def test_config_selection_and_ties():
    def trial(method, seed, val, test, val_loss, lr=1e-3):
        return {"params": {"model": "m", "dataset": "d", "method": method, "seed": seed, "lr": lr},
                "final": {"metric": "accuracy", "val_accuracy": val, "test_accuracy": test, "val_loss": val_loss}}
    # Two methods tie on mean val accuracy: the lower mean val loss wins; inside it, seeds tie on val
    # accuracy and the lower val loss wins again.
    ts = [trial("a", 0, 0.8, 0.5, 0.40), trial("a", 1, 0.8, 0.6, 0.30),
          trial("b", 0, 0.7, 0.9, 0.10), trial("b", 1, 0.9, 0.9, 0.20)]
    best = summ.best_trials(ts)[("m", "d")]
    assert (best["params"]["method"], best["params"]["seed"]) == ("b", 1)
    ts[3]["final"]["val_loss"] = 0.9   # now b's mean loss (0.5) is above a's (0.35)
    best = summ.best_trials(ts)[("m", "d")]
    assert (best["params"]["method"], best["params"]["seed"]) == ("a", 1)
    # A method with two learning rates: the row is the config with the better mean val.
    ts = [trial("c", 0, 0.6, 0.99, 0.1, lr=1e-2), trial("c", 1, 0.62, 0.98, 0.1, lr=1e-2),
          trial("c", 0, 0.7, 0.50, 0.1, lr=1e-4), trial("c", 1, 0.74, 0.52, 0.1, lr=1e-4)]
    row = summ.summary_table(ts).iloc[0]
    assert (row["lr"], row["n_configs"], row["n_seeds"]) == (1e-4, 2, 2)
    assert row["test_mean"] == pytest.approx(0.51) and row["val_mean"] == pytest.approx(0.72)
    assert "lr=0.0001" in summ.render(summ.summary_table(ts), "markdown")
    # lower-is-better main metrics rank the other way round
    assert not summ.higher_is_better("perplexity") and summ.higher_is_better("accuracy")


def test_the_analyses_add_their_columns_only_where_trials_ran_them():
    def trial(method, seed, **analysis):
        return {"params": {"model": "m", "dataset": "d", "method": method, "seed": seed, "lr": 1e-3},
                "final": {"metric": "accuracy", "val_accuracy": 0.8, "test_accuracy": 0.7, "val_loss": 0.4,
                          **analysis}}
    plain = summ.summary_table([trial("lora", 0), trial("cla", 0)])
    assert not set(summ.ANALYSIS_COLUMNS) & set(plain.columns)
    ts = [trial("lora", 0, gap=0.10, **{"analysis/bound_term": 2.0, "analysis/intruders_eps0.5": 1.0}),
          trial("lora", 1, gap=0.30, **{"analysis/bound_term": 2.0, "analysis/intruders_eps0.5": 3.0}),
          trial("cla", 0, gap=0.05)]
    df = summ.summary_table(ts).set_index("method")
    assert {"gap_mean", "bound_term", "intruders_mean"} <= set(df.columns)
    assert "sharpness_mean" not in df.columns   # no trial ran the landscape
    assert df.loc["lora", "gap_mean"] == pytest.approx(0.2) and df.loc["lora", "intruders_mean"] == 2.0
    assert df.loc["cla", "gap_mean"] == 0.05 and math.isnan(df.loc["cla", "bound_term"])
    text = summ.render(summ.summary_table(ts), "markdown")
    assert re.search(r"\|\s+gap\s+\|", text) and "intruders@0.5" in text and "0.2000" in text


def test_summary_artifacts(sweep):
    client, parent = sweep["client"], sweep["parent"]
    listed = {a.path for a in client.list_artifacts(parent, "summary")}
    assert listed == {f"summary/{n}" for n in ("summary.csv", "summary.parquet", "summary.md", "summary.png",
                                               "trials.csv")}
    dl = Path(client.download_artifacts(parent, "summary", str(sweep["root"] / "dl-summary")))
    expected = summ.summary_table(sweep["trials"])
    pd.testing.assert_frame_equal(pd.read_parquet(dl / "summary.parquet"), expected)
    csv = pd.read_csv(dl / "summary.csv")
    assert list(csv["method"]) == ["cla", "lora"]
    assert csv["test_mean"].tolist() == pytest.approx(expected["test_mean"].tolist(), rel=1e-12)
    md = (dl / "summary.md").read_text()
    cla, lora = _by_hand("cla"), _by_hand("lora")
    rows = markdown_rows(md)
    cells = {c for r in rows for c in r}
    assert f"{cla['test_mean']:.4f} ± {cla['test_std']:.4f}" in cells
    assert f"{lora['val_mean']:.4f} ± {lora['val_std']:.4f}" in cells
    assert rows[0][:6] == ["model", "dataset", "method", "seeds", "test accuracy", "val accuracy"]
    png = (dl / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    h, w = matplotlib.image.imread(dl / "summary.png").shape[:2]
    assert h > 100 and w > 100
    trials_csv = pd.read_csv(dl / "trials.csv")
    assert sorted(trials_csv["run_id"]) == sorted(sweep["run_ids"])


def test_results_table_from_mlflow(sweep):
    got = tracking.results_table(EXPERIMENT, sweep["uri"])
    pd.testing.assert_frame_equal(got, summ.summary_table(sweep["trials"]))
    same = tracking.results_table(EXPERIMENT, sweep["uri"], parent_run_id=sweep["parent"])
    pd.testing.assert_frame_equal(same, got)
    text = summ.render(got, "table")
    assert text.splitlines()[0].split()[:4] == ["model", "dataset", "method", "seeds"]
    assert f"{_by_hand('cla')['test_mean']:.4f} ± {_by_hand('cla')['test_std']:.4f}" in text
    assert summ.render(got, "csv").splitlines()[0].startswith("model,dataset,method,metric,n_seeds,test_mean")
    assert summ.render(got, "markdown") == summ.to_markdown(got)
    with pytest.raises(ValueError, match="valid: table, csv, markdown"):
        summ.render(got, "html")
    with pytest.raises(ValueError, match="no MLflow experiment"):
        tracking.results_table("no-such-experiment", sweep["uri"])


# -- the registry ----------------------------------------------------------------------------------
def logits_of(model) -> torch.Tensor:
    ids = torch.arange(1, 25).reshape(2, 12) % 250
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_registered_best_adapter(sweep):
    name = "sparta-random-llama-tiny-movie-reviews"
    [reg] = sweep["result"].registered
    assert (reg.name, reg.version, reg.method, reg.trial_key) == (name, "1", "cla", "cla-s1")
    best_index = list(FINALS).index(("cla", 1))
    assert reg.run_id == sweep["run_ids"][best_index]
    client = sweep["client"]
    versions = client.search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == ["1"]
    tags = versions[0].tags
    assert (tags["base_model"], tags["method"], tags["trial_key"], tags["metric"]) == \
        (MODEL, "cla", "cla-s1", "accuracy")
    assert float(tags["val_accuracy"]) == 0.78
    assert float(tags["val_accuracy_mean"]) == pytest.approx(0.77)
    assert versions[0].run_id == sweep["parent"]
    assert client.get_run(reg.run_id).data.tags["sparta.registered_model"] == f"{name}/1"
    assert [m.name for m in client.search_registered_models()] == [name]   # one per model x dataset

    with store.scoped_tracking_uri(sweep["uri"]):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/1")
    inner = pyfunc.unwrap_python_model()
    assert isinstance(inner, registry.AdapterModel)
    assert (inner.base_model, inner.task, inner.model_overrides) == (MODEL, "causal_lm", OVERRIDES)
    source = Path(sweep["trials"][best_index]["adapter_dir"])
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (inner.adapter_dir / f).read_bytes() == (source / f).read_bytes()
    with pytest.raises(ValueError, match="no tokenizer"):
        pyfunc.predict(["hello"])
    # The process-wide tracking URI is left as it was.
    assert mlflow.get_tracking_uri() != sweep["uri"]


def test_load_registered_matches_direct(sweep):
    uri = "models:/sparta-random-llama-tiny-movie-reviews/1"
    model, tok = registry.load_registered(uri, sweep["uri"])
    assert tok is None
    best = Path(sweep["trials"][list(FINALS).index(("cla", 1))]["adapter_dir"])
    direct = tiny_base()
    adapters.load(direct, best)
    got = logits_of(model)
    assert torch.equal(got, logits_of(direct))
    # ... and the comparison can fail: the base alone and another trial's adapter differ.
    assert not torch.allclose(got, logits_of(tiny_base()), atol=1e-4)
    other = tiny_base()
    adapters.load(other, sweep["trials"][list(FINALS).index(("cla", 0))]["adapter_dir"])
    assert not torch.allclose(got, logits_of(other), atol=1e-4)
    merged, _ = registry.load_registered(uri, sweep["uri"], merge=True)
    assert not any(isinstance(m, adapters.AdapterLayer) for m in merged.modules())
    assert torch.allclose(logits_of(merged), got, atol=1e-5)


def test_adapter_model_config_for_a_classifier(tmp_path):
    model, _ = load_model("random:bert-tiny", task="classification", num_labels=3)
    handle = adapters.apply(model, AdapterConfig(method="cla", rank=4))
    handle.save(tmp_path / "a")
    cfg = registry.adapter_model_config({"model": "random:bert-tiny", "method": "cla"}, tmp_path / "a")
    assert (cfg["task"], cfg["num_labels"]) == ("classification", 3)
    cfg = registry.adapter_model_config({"model": "random:gpt2-tiny", "method": "cla", "task": "causal_lm"},
                                        tmp_path / "a")
    assert (cfg["task"], cfg["num_labels"]) == ("causal_lm", None)
    assert registry.registered_model_name("/data/models/My Model/", "movie-reviews-binary") == \
        "sparta-My-Model-movie-reviews-binary"


# -- the UI ----------------------------------------------------------------------------------------


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def test_ui_serves_the_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    store.ensure_experiment(uri, "ui-visible")
    port = free_port()
    argv, server_env = store.ui_command(port, uri)
    opts = dict(zip(argv[4::2], argv[5::2]))
    assert argv[1:4] == ["-m", "mlflow", "server"] and opts["--host"] == "127.0.0.1"
    assert (opts["--port"], opts["--backend-store-uri"]) == (str(port), uri)
    assert opts["--default-artifact-root"] == str(tmp_path / "mlruns" / "artifacts")
    assert server_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    with pytest.raises(ValueError, match="tracking server already"):
        store.ui_command(port, "http://127.0.0.1:5000")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    logf = open(tmp_path / "ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--port", str(port),
                             "--tracking-uri", uri], cwd=tmp_path, env=env, stdout=logf, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, body = _get(base + "/")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        assert status == 200, (tmp_path / "ui.log").read_text()[-3000:]
        assert b"<html" in body.lower() or b"<!doctype" in body.lower()
        # It serves our store: the experiment made above is there.
        status, body = _get(base + "/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=ui-visible")
        assert status == 200 and json.loads(body)["experiment"]["name"] == "ui-visible"
    finally:
        proc.terminate()   # exactly the process we started (it became the server by exec)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        logf.close()
    # Nothing is left listening on the port.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(0.5)
        except OSError:
            break
    else:
        pytest.fail("the UI's port is still open after terminating it")

"""The sweep spec: examples validate and expand, bad specs name the field, sampling is deterministic,
and validation stays light (no Ray, no MLflow, no model loading)."""
import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adapters import METHODS
from pipelines.sweeps.spec import HYPERPARAMS, SpecError, SweepSpec, load_spec
from workers.data.assets import model_choices
from workers.data.datasets import TASKS

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
TRIAL_FIELDS = ["model", "dataset", "method", "seed", *HYPERPARAMS, "trial_key"]
CONFIG_FIELDS = {"model", "dataset", "method", "seed", *HYPERPARAMS, "trial_key", "epochs", "steps",
                 "batch_size", "max_length", "eval_every", "eval_examples", "precision", "framing",
                 "deepspeed", "analysis", "analysis_settings"}
BASE = {"experiment": "t", "models": ["minilm-l6"], "datasets": ["movie-reviews"], "methods": ["lora"],
        "train": {"steps": 3}}


def spec(**changes) -> dict:
    """BASE with dotted-path changes: spec(**{"train.steps": 5, "methods": [...]})."""
    d = copy.deepcopy(BASE)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return d


def validate(**changes) -> SweepSpec:
    return SweepSpec.model_validate(spec(**changes))


def spec_error(d: dict) -> SpecError:
    with pytest.raises(SpecError) as info:
        SweepSpec.model_validate(d)
    return info.value


# -- the examples ----------------------------------------------------------------------------------
def test_tiny_example_expands_to_methods_x_seeds():
    s = load_spec(EXAMPLES / "sweep-tiny.yaml")
    trials = s.trials()
    assert [(t["method"], t["seed"]) for t in trials] == [("lora", 0), ("lora", 1), ("cla", 0), ("cla", 1)]
    assert {t["model"] for t in trials} == {"minilm-l6"}
    assert {t["dataset"] for t in trials} == {"movie-reviews-binary"}
    assert all(list(t) == TRIAL_FIELDS for t in trials)
    assert trials[0] == {"model": "minilm-l6", "dataset": "movie-reviews-binary", "method": "lora", "seed": 0,
                         "lr": 1e-3, "rank": 8, "alpha": 16.0, "chain_segments": 3,
                         "lora_plus_ratio": 16.0, "weight_decay": 0.0,
                         "trial_key": "minilm-l6/movie-reviews-binary/lora/seed0"}
    assert s.train.steps <= 10 and s.train.epochs is None   # seconds, not minutes
    cfg = s.trial_config(trials[3])
    assert set(cfg) == CONFIG_FIELDS
    assert (cfg["method"], cfg["seed"], cfg["steps"], cfg["framing"]) == ("cla", 1, 4, "classification")
    json.dumps(cfg)   # plain values only: travels through Ray and MLflow as is


def test_small_example_is_the_make_run_sweep():
    s = load_spec(EXAMPLES / "sweep-small.yaml")
    trials = s.trials()
    assert s.models == ["smollm2-135m"] and s.seeds == [0]
    assert {"lora", "cla"} <= set(s.methods) and 3 <= len(s.methods) <= 5
    assert len(trials) == len(s.methods)
    assert [t["trial_key"] for t in trials] == [f"smollm2-135m/movie-reviews/{m}/seed0" for m in s.methods]
    cfg = s.trial_config(trials[0])
    assert cfg["framing"] == "generation" and cfg["dataset"] == "movie-reviews"
    assert cfg["max_length"] <= 128 and cfg["steps"] * cfg["batch_size"] * len(trials) <= 1200
    assert cfg["deepspeed"]["zero_optimization"] == {"stage": 0}
    # The defaults for a small CPU machine.
    assert (s.resources.workers_per_trial, s.resources.cpus_per_worker, s.resources.gpus_per_worker) == (1, 1, 0)
    assert (s.scheduler.type, s.max_concurrent, s.max_failures, s.train.precision) == ("fifo", 1, 1, "auto")


def test_trial_config_carries_train_and_deepspeed():
    s = validate(**{"train": {"epochs": 2, "batch_size": 4, "max_length": 32, "eval_every": 5,
                              "precision": "bf16"}, "deepspeed.zero_stage": 2})
    cfg = s.trial_config(s.trials()[0])
    assert (cfg["epochs"], cfg["steps"], cfg["batch_size"], cfg["max_length"], cfg["eval_every"],
            cfg["precision"]) == (2, None, 4, 32, 5, "bf16")
    assert cfg["deepspeed"] == {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                                "zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                                "zero_allow_untested_optimizer": True}


def test_a_dumped_spec_validates_to_the_same_spec(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\nx,1\n")
    rich = spec(models=["minilm-l6", "random:gpt2-tiny"],
                datasets=["movie-reviews", {"path": str(tmp_path / "t.csv"), "split": "fold"}],
                search={"lr": {"loguniform": [1e-5, 1e-3]}, "rank": [4, 8], "num_samples": 2},
                **{"train.eval_every": 1, "scheduler": {"type": "asha"}, "deepspeed.config": {"x": 1}})
    for s in (load_spec(EXAMPLES / "sweep-tiny.yaml"), load_spec(EXAMPLES / "sweep-small.yaml"),
              SweepSpec.model_validate(rich)):
        dumped = json.loads(json.dumps(s.model_dump()))   # what MLflow records as the resolved spec
        again = SweepSpec.model_validate(dumped)
        assert again == s and again.trials() == s.trials()


# -- expansion -------------------------------------------------------------------------------------
def test_grid_expansion_order_and_keys():
    s = validate(models=["smollm2-135m", "random:llama-tiny"], datasets=["movie-reviews", "movie-reviews-binary"],
                 methods=["lora", "cla", "c3la"], seeds=[0, 1],
                 search={"lr": [1e-4, 3e-4], "rank": [8, 16, 32], "weight_decay": 0.0})
    trials = s.trials()
    assert len(trials) == 2 * 2 * 3 * 2 * 2 * 3
    assert len({t["trial_key"] for t in trials}) == len(trials)
    assert trials[0]["trial_key"] == "smollm2-135m/movie-reviews/lora/seed0/lr=1e-4,rank=8"
    assert trials[5]["trial_key"] == "smollm2-135m/movie-reviews/lora/seed0/lr=3e-4,rank=32"
    assert trials[6]["trial_key"] == "smollm2-135m/movie-reviews/lora/seed1/lr=1e-4,rank=8"
    assert trials[-1]["trial_key"] == "random:llama-tiny/movie-reviews-binary/c3la/seed1/lr=3e-4,rank=32"
    assert [(t["lr"], t["rank"], t["alpha"]) for t in trials[:3]] == [(1e-4, 8, 16.0), (1e-4, 16, 32.0),
                                                                      (1e-4, 32, 64.0)]
    assert all(t["weight_decay"] == 0.0 and t["chain_segments"] == 3 for t in trials)
    assert all(type(t["rank"]) is int and type(t["lr"]) is float for t in trials)


def test_explicit_alpha_and_framing_per_model_kind():
    s = validate(models=["minilm-l6", "random:qwen2-tiny"], search={"alpha": [8, None], "rank": 4})
    trials = s.trials()
    assert [t["alpha"] for t in trials] == [8.0, 8.0, 8.0, 8.0]   # None -> 2 * rank = 8
    assert [t["trial_key"].split("/")[-1] for t in trials[:2]] == ["alpha=8", "alpha=auto"]
    assert [s.trial_config(t)["framing"] for t in trials] == ["classification"] * 2 + ["generation"] * 2
    forced = validate(models=["random:qwen2-tiny"], **{"train.framing": "classification"})
    assert forced.trial_config(forced.trials()[0])["framing"] == "classification"
    tiny = validate(models=["random:bert-tiny", "random:deberta-v2-tiny", "random:gpt2-tiny"])
    assert [tiny.framing(m) for m in tiny.models] == ["classification", "classification", "generation"]
    e = spec_error(spec(models=["random:gpt2-tiny", "random:bert-tiny"], **{"train.framing": "generation"}))
    assert e.errors[0][0] == "train.framing" and "models[1] 'random:bert-tiny'" in e.errors[0][1]


SAMPLED = {"lr": {"loguniform": [1e-5, 1e-3]}, "weight_decay": {"uniform": [0.0, 0.1]},
           "rank": {"choice": [4, 8, 16]}, "chain_segments": [2, 4], "num_samples": 20}


def test_sampling_is_deterministic_paired_and_in_range():
    a = validate(search=SAMPLED, methods=["lora", "cla"], seeds=[0, 1]).trials()
    b = validate(search=SAMPLED, methods=["lora", "cla"], seeds=[0, 1]).trials()
    assert a == b
    other = validate(search={**SAMPLED, "seed": 1}, methods=["lora", "cla"], seeds=[0, 1]).trials()
    assert [t["lr"] for t in other] != [t["lr"] for t in a]
    assert len(a) == 2 * 2 * 2 * 20 and len({t["trial_key"] for t in a}) == len(a)
    # Every method and seed sees the same draws (paired comparison); the grid points differ.
    per = {}
    for t in a:
        per.setdefault((t["method"], t["seed"]), []).append((t["chain_segments"], t["lr"], t["rank"]))
    assert len({tuple(v) for v in per.values()}) == 1
    draws = per["lora", 0]
    assert [d[1] for d in draws[:20]] != [d[1] for d in draws[20:]]
    lrs, wds = [t["lr"] for t in a], [t["weight_decay"] for t in a]
    assert all(1e-5 <= v <= 1e-3 for v in lrs) and all(0.0 <= v <= 0.1 for v in wds)
    assert {t["rank"] for t in a} == {4, 8, 16}
    logs = [math.log10(v) for v in lrs]   # log-uniform: both decades are hit
    assert min(logs) < -4 < max(logs)
    assert "/lr=" in a[0]["trial_key"] and a[0]["trial_key"].endswith(",sample=0")


# -- bad specs -------------------------------------------------------------------------------------
BAD = [
    # (changes, field path, substrings of the message)
    ({"methods": ["lora", "lorra"]}, "methods[1]", ["'lorra'", *METHODS]),
    ({"methods": []}, "methods", ["empty"]),
    ({"methods": ["lora", "lora"]}, "methods[1]", ["duplicate"]),
    ({"models": ["minilm-l6", "no-such-model"]}, "models[1]", ["'no-such-model'", *model_choices()]),
    ({"models": ["random:foo-tiny"]}, "models[0]", ["random:llama-tiny", "minilm-l6"]),
    ({"models": ["random:llama"]}, "models[0]", ["random:llama-tiny"]),
    ({"models": []}, "models", ["empty"]),
    ({"datasets": ["movie-reviews", "no-such-task"]}, "datasets[1]", ["'no-such-task'", *TASKS]),
    ({"datasets": [{"path": "/no/such/file.csv", "text": "t", "label": "l"}]}, "datasets[0].path",
     ["/no/such/file.csv"]),
    ({"datasets": [{"train": "/no/such/train.jsonl"}]}, "datasets[0].train", ["/no/such/train.jsonl"]),
    ({"datasets": [{"name": "movie-reviews", "label": "y"}]}, "datasets[0].label", ["built in"]),
    ({"datasets": []}, "datasets", ["empty"]),
    ({"seeds": []}, "seeds", ["empty"]),
    ({"seeds": [0, "1"]}, "seeds[1]", ["integer"]),
    ({"search.lr": []}, "search.lr", ["empty"]),
    ({"search.lr": "fast"}, "search.lr", ["number", "loguniform"]),
    ({"search.lr": [1e-4, -1.0]}, "search.lr[1]", ["> 0"]),
    ({"search.rank": [8, 8.5]}, "search.rank[1]", ["integer"]),
    ({"search.rank": True}, "search.rank", ["integer"]),
    ({"search.rank": {"uniform": [4, 16]}}, "search.rank.uniform", ["choice"]),
    ({"search.lr": {"loguniform": [1e-3, 1e-5]}}, "search.lr.loguniform", ["low < high"]),
    ({"search.lr": {"loguniform": [0, 1e-3]}}, "search.lr.loguniform[0]", ["> 0"]),
    ({"search.lr": {"normal": [0, 1]}}, "search.lr", ["loguniform", "uniform", "choice"]),
    ({"search.lr": {"choice": []}}, "search.lr.choice", ["non-empty"]),
    ({"search.weight_decay": {"uniform": [-1, 0.1]}}, "search.weight_decay.uniform[0]", [">= 0"]),
    ({"search.num_samples": 4}, "search.num_samples", ["sampled"]),
    ({"search.lr": [1.000001e-4, 1.000002e-4]}, "search", ["same trial key", "lr=1e-4"]),
    ({"search.gamma": 1}, "search.gamma", ["unknown field", "lr", "rank", "num_samples"]),
    ({"train": {"steps": 3, "epochs": 1}}, "train.epochs", ["exactly one", "train.steps"]),
    ({"train": {"batch_size": 8}}, "train.epochs", ["exactly one", "train.steps"]),
    ({"train.epochs": 1.5, "train.steps": None}, "train.epochs", ["integer"]),
    ({"train.batch_size": "8"}, "train.batch_size", ["integer"]),
    ({"train.batch_size": 0}, "train.batch_size", ["greater than or equal to 1"]),
    ({"train.precision": "fp16"}, "train.precision", ["'fp32'", "'bf16'"]),
    ({"train.framing": "chat"}, "train.framing", ["'classification'", "'generation'", "'auto'"]),
    ({"train.framing": "generation"}, "train.framing", ["causal", "minilm-l6"]),
    ({"deepspeed.zero_stage": 5}, "deepspeed.zero_stage", ["0, 1 or 2"]),
    ({"deepspeed.zero_stage": 3}, "deepspeed.zero_stage", ["stage 3 is not supported", "0, 1 or 2"]),
    ({"deepspeed.config": {"zero_optimization": {"stage": 3}}}, "deepspeed.config", ["stage 3"]),
    ({"deepspeed.config": {"optimizer": {"type": "Adam"}}}, "deepspeed.config", ["'optimizer' section"]),
    ({"deepspeed.offload": "nvme"}, "deepspeed.offload", ["'none'", "'cpu'"]),
    ({"deepspeed.offload": "cpu"}, "deepspeed.offload", ["zero_stage"]),
    ({"deepspeed.bf16": True}, "deepspeed.bf16", ["train.precision"]),
    ({"deepspeed.zero_stage": 2, "deepspeed.config": {}}, "deepspeed.zero_stage", ["config"]),
    ({"resources.workers_per_trial": 0}, "resources.workers_per_trial", ["greater than or equal to 1"]),
    ({"resources.gpus": 1}, "resources.gpus", ["unknown field", "gpus_per_worker"]),
    ({"scheduler.type": "hyperband"}, "scheduler.type", ["'fifo'", "'asha'"]),
    ({"scheduler.max_t": 4}, "scheduler.max_t", ["asha"]),
    ({"scheduler.type": "asha"}, "train.eval_every", ["asha"]),
    ({"scheduler.type": "asha", "train": {"epochs": 3}}, "train.eval_every", ["asha"]),
    ({"scheduler": {"type": "asha", "grace_period": 4}, "train.eval_every": 1}, "scheduler.grace_period",
     ["3 evaluations"]),
    ({"scheduler": {"type": "asha", "mode": "up"}, "train.eval_every": 1}, "scheduler.mode", ["'max'", "'min'"]),
    ({"max_concurrent": 0}, "max_concurrent", ["greater than or equal to 1"]),
    ({"max_failures": "one"}, "max_failures", ["integer"]),
    ({"experiment": ""}, "experiment", ["at least 1 character"]),
    ({"experiment": None}, "experiment", ["string"]),
    ({"mlflow": "x"}, "mlflow", ["unknown field", "experiment", "max_failures"]),
    ({"analysis": ["gap", "hessian"]}, "analysis[1]", ["'gap'", "'bounds'", "'landscape'"]),
    ({"analysis": ["bounds", "bounds"]}, "analysis[1]", ["duplicate analysis"]),
    ({"analysis_settings.landscape_points": 8}, "analysis_settings.landscape_points", ["odd"]),
    ({"analysis_settings.landscape_points_2d": 1}, "analysis_settings.landscape_points_2d", ["greater than or equal to 3"]),
    ({"analysis_settings.sigma": 0}, "analysis_settings.sigma", ["greater than 0"]),
    ({"analysis_settings.hessian": 1}, "analysis_settings.hessian", ["unknown field", "intruder_k", "bits"]),
    ({"search.by_method": {"lorra": {"lr": 1e-4}}}, "search.by_method.lorra", ["unknown method", "lora_plus"]),
    ({"search.by_method": {"cla": {"lr": 1e-4}}}, "search.by_method.cla", ["not one of this sweep's methods",
                                                                             "lora"]),
    ({"search.by_method": {"lora": {"gamma": 1}}}, "search.by_method.lora.gamma", ["unknown hyper-parameter",
                                                                                   "lr", "weight_decay"]),
    ({"search.by_method": {"lora": {}}}, "search.by_method.lora", ["mapping of hyper-parameters"]),
    ({"search.by_method": {"lora": {"lr": -1.0}}}, "search.by_method.lora.lr", ["> 0"]),
    ({"search.by_method": {"lora": {"rank": {"uniform": [4, 8]}}}}, "search.by_method.lora.rank.uniform",
     ["choice"]),
]


@pytest.mark.parametrize("changes,path,needles", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_spec_names_the_field(changes, path, needles):
    e = spec_error(spec(**changes))
    assert isinstance(e, ValueError)
    assert [p for p, _ in e.errors] == [path]
    assert f"  {path}: " in str(e)
    for needle in needles:
        assert needle in e.errors[0][1]


def test_a_built_in_task_without_its_data_is_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARTA_CACHE", str(tmp_path))   # no sdist cached here
    e = spec_error(spec(datasets=["strategyqa"]))
    assert [p for p, _ in e.errors] == ["datasets[0]"]
    assert "bigbench-1.0.0.tar.gz" in e.errors[0][1] and "make bigbench" in e.errors[0][1]


def test_missing_required_fields_are_all_named():
    e = spec_error({"experiment": "t"})
    assert {p for p, _ in e.errors} == {"models", "datasets", "methods", "train"}


def test_validation_loads_no_model(monkeypatch):
    import dataclasses

    import workers.data.assets as assets

    def boom(*a, **k):
        raise AssertionError("validation must not load or export a model")
    monkeypatch.setattr(assets, "load_model", boom)
    monkeypatch.setattr(assets, "_random_model", boom)
    monkeypatch.setattr(assets, "MODELS", {k: dataclasses.replace(v, locate=boom) for k, v in assets.MODELS.items()})
    s = validate(models=["smollm2-135m", "gemma3-270m", "minilm-l6", "random:llama-tiny"])
    cfgs = [s.trial_config(t) for t in s.trials()]
    assert [c["framing"] for c in cfgs] == ["generation", "generation", "classification", "generation"]


# -- files and folders -----------------------------------------------------------------------------
def test_yaml_file_with_relative_paths(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "reviews.csv").write_text("review,stars\ngood,1\n")
    model = tmp_path / "my-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent("""\
        experiment: files
        models: [my-llama]
        datasets:
          - {path: data/reviews.csv, text: review, label: stars}
        methods: [cla]
        search: {lr: 1e-4}          # YAML 1.1 would read 1e-4 as a string
        train: {epochs: 1}
        """))
    s = load_spec(path)
    trial = s.trials()[0]
    assert trial["lr"] == 1e-4 and isinstance(trial["lr"], float)
    assert trial["model"] == str(model.resolve())
    assert trial["trial_key"] == "my-llama/reviews/cla/seed0"
    cfg = s.trial_config(trial)
    assert cfg["framing"] == "generation"   # auto, and config.json says causal LM
    assert cfg["dataset"] == {"name": "reviews", "path": str((tmp_path / "data" / "reviews.csv").resolve()),
                              "train": None, "validation": None, "test": None, "text": "review",
                              "label": "stars", "split": None}


def test_dataset_forms(tmp_path):
    for name in ("train.jsonl", "val.jsonl", "table.parquet", "notes.txt"):
        (tmp_path / name).write_text("{}\n")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    ctx = {"base_dir": tmp_path}
    ok = SweepSpec.model_validate(spec(datasets=[
        {"name": "split-files", "train": "train.jsonl", "validation": "val.jsonl"},
        {"path": "table.parquet", "split": "fold"},
        {"path": "saved"},
        {"name": "movie-reviews-binary"},
    ]), context=ctx)
    assert [d.name for d in ok.datasets] == ["split-files", "table", "saved", "movie-reviews-binary"]
    assert [t["dataset"] for t in ok.trials()] == ["split-files", "table", "saved", "movie-reviews-binary"]
    assert ok.trial_config(ok.trials()[3])["dataset"] == "movie-reviews-binary"
    assert ok.trial_config(ok.trials()[0])["dataset"]["validation"] == str(tmp_path / "val.jsonl")
    bad = [
        ({"path": "notes.txt"}, "datasets[0].path", ".txt"),
        ({"path": "empty"}, "datasets[0].path", "dataset_dict.json"),
        ({"path": "table.parquet", "train": "train.jsonl"}, "datasets[0].train", "not both"),
        ({"path": "table.parquet", "test": "val.jsonl"}, "datasets[0].test", "train"),
        ({"train": "train.jsonl", "split": "fold"}, "datasets[0].split", "path"),
        ({"name": "movie-reviews", "path": "table.parquet"}, "datasets[0].name", "built-in"),
        ({"name": "a/b", "path": "table.parquet"}, "datasets[0].name", "'/'"),
    ]
    for entry, path, needle in bad:
        with pytest.raises(SpecError) as info:
            SweepSpec.model_validate(spec(datasets=[entry]), context=ctx)
        assert [p for p, _ in info.value.errors] == [path], entry
        assert needle in info.value.errors[0][1], entry
    with pytest.raises(SpecError) as info:
        SweepSpec.model_validate(spec(datasets=[{"path": "saved"}, {"name": "saved", "path": "table.parquet"}]),
                                 context=ctx)
    assert info.value.errors[0][0] == "datasets[1].name"


def test_encoder_folder_is_framed_as_classification(tmp_path):
    (tmp_path / "my-bert").mkdir()
    (tmp_path / "my-bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    s = SweepSpec.model_validate(spec(models=["my-bert"]), context={"base_dir": tmp_path})
    assert s.trial_config(s.trials()[0])["framing"] == "classification"
    with pytest.raises(SpecError) as info:
        SweepSpec.model_validate(spec(models=["my-bert"], **{"train.framing": "generation"}),
                                 context={"base_dir": tmp_path})
    assert info.value.errors[0][0] == "train.framing"


def test_model_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(SpecError) as info:
        SweepSpec.model_validate(spec(models=["not-a-model"]), context={"base_dir": tmp_path})
    assert info.value.errors[0][0] == "models[0]" and "config.json" in info.value.errors[0][1]


def test_load_spec_file_errors(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("experiment: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match=str(listed)):
        load_spec(listed)


# -- DeepSpeed and the scheduler -------------------------------------------------------------------
def test_deepspeed_offload_and_override():
    z2 = validate(**{"deepspeed.zero_stage": 2, "deepspeed.offload": "cpu"}).deepspeed_config()
    assert z2["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert z2["zero_force_ds_cpu_optimizer"] is False and z2["zero_allow_untested_optimizer"] is True
    z1 = validate(**{"deepspeed.zero_stage": 1, "deepspeed.offload": "cpu"}).deepspeed_config()
    assert z1["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu"}}
    custom = {"zero_optimization": {"stage": 2, "overlap_comm": True}, "gradient_clipping": 1.0}
    s = validate(**{"deepspeed.config": custom})
    merged = s.deepspeed_config()
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert merged["gradient_clipping"] == 1.0 and merged["train_micro_batch_size_per_gpu"] == 8
    merged["zero_optimization"]["stage"] = 0
    assert s.deepspeed_config()["zero_optimization"]["stage"] == 2   # a fresh dict each call


def test_asha_max_t_follows_the_evaluations():
    s = validate(**{"scheduler": {"type": "asha"}, "train.steps": 50, "train.eval_every": 10})
    assert (s.scheduler.max_t, s.scheduler.metric, s.scheduler.mode) == (5, "val_accuracy", "max")
    # by epochs the evaluations per trial are unknown before the data loads: max_t must be given
    by_epoch = {"scheduler": {"type": "asha", "grace_period": 2}, "train": {"epochs": 6, "eval_every": 10}}
    with pytest.raises(SpecError, match="scheduler.max_t: .*in evaluations"):
        validate(**by_epoch)
    given_by_epoch = validate(**{**by_epoch, "scheduler": {"type": "asha", "grace_period": 2, "max_t": 8}})
    assert given_by_epoch.scheduler.max_t == 8
    given = validate(**{"scheduler": {"type": "asha", "max_t": 3}, "train.eval_every": 1})
    assert given.scheduler.max_t == 3


# -- weight ----------------------------------------------------------------------------------------
def test_validation_is_light_and_fast():
    code = textwrap.dedent(f"""
        import json, sys, time
        import pipelines.sweeps.spec as spec
        at_import = [m for m in ("torch", "transformers", "ray", "mlflow") if m in sys.modules]
        spec.load_spec({str(EXAMPLES / 'sweep-small.yaml')!r})   # the first call imports the registries
        t = time.perf_counter()
        try:
            spec.SweepSpec.model_validate({{**{BASE!r}, "methods": ["lorra"]}})
            rejected = False
        except spec.SpecError:
            rejected = True
        s = spec.load_spec({str(EXAMPLES / 'sweep-tiny.yaml')!r})
        s.trial_config(s.trials()[0])
        warm = time.perf_counter() - t
        after = [m for m in ("ray", "mlflow", "deepspeed") if m in sys.modules]
        print(json.dumps({{"at_import": at_import, "rejected": rejected, "warm": warm, "after": after}}))
        """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["at_import"] == []     # importing the spec module pulls in no torch, Ray or MLflow
    assert result["rejected"] is True
    assert result["after"] == []         # nor does validating and expanding (Ray, MLflow, DeepSpeed)
    assert result["warm"] < 1.0


def test_analysis_reaches_every_trial_and_names_what_the_worker_runs():
    import typing

    from pipelines.sweeps.spec import Analysis
    from workers.training.analysis import ANALYSES

    assert typing.get_args(Analysis) == ANALYSES
    assert validate().analysis == []
    parsed = validate(analysis=["bounds", "gap"])
    assert all(parsed.trial_config(t)["analysis"] == ["bounds", "gap"] for t in parsed.trials())


def test_analysis_settings_match_the_workers_and_reach_every_trial():
    import dataclasses

    from pipelines.sweeps.spec import AnalysisSettingsSpec
    from workers.training.analysis import AnalysisSettings

    # every setting but the directions' seed (a trial's own seed is the run's) is a spec field, same defaults
    worker = {f.name: f.default for f in dataclasses.fields(AnalysisSettings) if f.name != "seed"}
    assert AnalysisSettingsSpec().model_dump() == worker
    parsed = validate(analysis=["landscape"], analysis_settings={"landscape_points": 5, "intruder_k": 3})
    for t in parsed.trials():
        settings = AnalysisSettings.from_dict(parsed.trial_config(t)["analysis_settings"])
        assert (settings.landscape_points, settings.landscape_points_2d, settings.intruder_k) == (5, 7, 3)


def test_by_method_overrides_one_methods_values_and_keeps_the_keys():
    parsed = validate(methods=["full", "lora", "lora_plus"],
                      search={"lr": 1e-3, "rank": [4, 8], "by_method": {"full": {"lr": 5e-5},
                                                                        "lora_plus": {"lr": [1e-4, 2e-4]}}})
    rows = {t["trial_key"]: t["lr"] for t in parsed.trials()}
    assert rows == {
        "minilm-l6/movie-reviews/full/seed0/rank=4": 5e-5, "minilm-l6/movie-reviews/full/seed0/rank=8": 5e-5,
        "minilm-l6/movie-reviews/lora/seed0/rank=4": 1e-3, "minilm-l6/movie-reviews/lora/seed0/rank=8": 1e-3,
        "minilm-l6/movie-reviews/lora_plus/seed0/lr=1e-4,rank=4": 1e-4,
        "minilm-l6/movie-reviews/lora_plus/seed0/lr=1e-4,rank=8": 1e-4,
        "minilm-l6/movie-reviews/lora_plus/seed0/lr=2e-4,rank=4": 2e-4,
        "minilm-l6/movie-reviews/lora_plus/seed0/lr=2e-4,rank=8": 2e-4,
    }
    # the shared values stay as they were for the other methods, alpha still follows each trial's rank
    assert {(t["method"], t["rank"], t["alpha"]) for t in parsed.trials()} >= {("lora", 8, 16.0), ("full", 4, 8.0)}
    # a sampled override draws from the same seeded RNG: the same spec gives the same values
    sampled = dict(methods=["full", "lora"], search={"by_method": {"full": {"lr": {"loguniform": [1e-5, 1e-4]}}}})
    first, again = validate(**sampled).trials(), validate(**sampled).trials()
    assert [t["lr"] for t in first] == [t["lr"] for t in again]
    assert 1e-5 <= first[0]["lr"] <= 1e-4 and first[1]["lr"] == 1e-3

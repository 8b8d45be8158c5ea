"""`sparta eval niah`: argument checks before any model loads; an in-process run on a tiny random model
into MLflow (grid metrics, heatmaps, tables, identical prompts across configurations); and, slow, the
real SmolLM2-135M through a Ray Serve endpoint on 127.0.0.1 answering the same with certified ART as
without."""
from __future__ import annotations

import csv
import json
import os
import time
from collections import defaultdict

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipelines.evaluation import niah as ev
from pipelines.cli import app
from workers.data.niah import score
from tests.helpers import free_port
from tests.helpers import markdown_rows

TINY = ["--model", "random:llama-tiny", "--model-override", "max_position_embeddings=1024", "--dtype", "float32"]
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       **{k: os.environ[k] for k in ("SPARTA_CACHE", "TORCH_EXTENSIONS_DIR") if os.environ.get(k)}}


def flat(text: str) -> str:
    """The CLI's output without rich's box and line wraps."""
    return " ".join(text.replace("│", " ").split())


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: argument errors must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("workers.data.assets.load_model", refuse)


@pytest.mark.parametrize("args, message", [
    (["--variants", "single,needle"], "unknown 'needle'; give one or more distinct of: single, multikey, multivalue, multiquery"),
    (["--policies", "dense,snap"], "unknown 'snap'; give one or more distinct of: dense, streaming, snapkv"),
    (["--art", "off,fastest"], "unknown ART preset 'fastest'; valid: paper, certified, tuned, aggressive, skip, walk"),
    (["--art", "off,tuned+tauu=1"], "unknown ART field 'tauu'"),
    (["--depths", "0.1,1.5"], r"fractions in [0, 1], got [0.1, 1.5]"),
    (["--depths", "0.1,x"], "comma list of numbers"),
    (["--lengths", "600,4096"], "its answer need 4"),   # 4096 + the answer budget > the 1024 positions
    (["--lengths", "300", "--variants", "multiquery"], "leaves no room for a haystack"),
    (["--haystack", "sand"], "unknown haystack 'sand'; valid: essays, noise"),
])
def test_cli_refuses_bad_arguments_before_loading(no_model_load, tmp_path, args, message):
    r = CliRunner().invoke(app, ["eval", "niah", *TINY, "--out", str(tmp_path), *args])
    assert r.exit_code == 2, r.output
    assert message in flat(r.output), r.output
    assert not (tmp_path / "niah.csv").exists()


def test_cli_needs_exactly_one_source(no_model_load):
    for args in ([], ["--model", "random:llama-tiny", "--endpoint", "http://127.0.0.1:9"]):
        r = CliRunner().invoke(app, ["eval", "niah", *args])
        assert r.exit_code == 2 and "exactly one of a model" in flat(r.output), r.output
    r = CliRunner().invoke(app, ["eval", "niah", "--model", "random:llama-tiny", "--lengths", "1024"])
    assert r.exit_code == 2 and "(its max_position_embeddings) allows 128" in flat(r.output), r.output   # the tiny model's positions
    r = CliRunner().invoke(app, ["eval", "niah", "--endpoint", "http://127.0.0.1:9"])   # nothing listens there
    assert r.exit_code == 1 and "http://127.0.0.1:9/v1/models" in flat(r.output), r.output


def _run_metrics(uri: str, experiment: str):
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def test_in_process_run_logs_the_grid_heatmaps_and_tables(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "out"
    lengths, depths = (600, 800), (0.0, 0.5, 1.0)
    variants = ("single", "multikey", "multivalue", "multiquery")
    configs = ("dense/off", "dense/tuned+block_size=16", "snapkv/off", "snapkv/tuned+block_size=16")
    r = CliRunner().invoke(app, ["eval", "niah", *TINY, "--lengths", "600,800", "--depths", "0,0.5,1",
                                 "--policies", "dense,snapkv", "--art", "off,tuned+block_size=16", "--max-tokens", "6",
                                 "--tracking-uri", uri, "--experiment", "niah-test", "--out", str(out)])
    assert r.exit_code == 0, r.output
    for label in configs:
        assert label in r.output   # the printed table
    client, run = _run_metrics(uri, "niah-test")
    assert run.info.status == "FINISHED" and run.data.tags["sparta.eval"] == "niah"
    m = run.data.metrics
    grid = {k: v for k, v in m.items() if k.startswith("niah/")}
    keys = [c.replace("+", "_").replace("=", "") for c in configs]
    assert set(grid) == {f"niah/{k}/{v}/{n}/{d:g}" for k in keys for v in variants for n in lengths for d in depths}
    assert all(0.0 <= v <= 1.0 for v in grid.values())
    for k in keys:
        assert m[f"tokens_per_s/{k}"] > 0 and 0.0 <= m[f"skipped_fraction/{k}"] <= 1.0
        assert 0.0 <= m[f"accuracy/{k}"] <= 1.0 and {f"accuracy/{k}/{v}" for v in variants} <= set(m)
    assert m["skipped_fraction/dense/off"] == 0.0
    # artifacts: one heatmap per configuration, the CSV grid, markdown, every answer
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"niah.csv", "niah.md", "answers.jsonl", "niah.json", "heatmaps"} <= names
    heatmaps = {a.path for a in client.list_artifacts(run.info.run_id, "heatmaps")}
    assert len(heatmaps) == len(configs) and all(p.endswith(".png") for p in heatmaps)
    assert all((out / p.split("/")[-1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in heatmaps)
    rows = list(csv.DictReader((out / "niah.csv").open()))
    assert len(rows) == len(configs) * len(variants) * len(lengths) * len(depths)
    assert all(0.0 <= float(row["accuracy"]) <= 1.0 and row["prompts"] == "1" for row in rows)
    # the answers: the same prompts for every configuration, and the metrics recomputed from them
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    prompts = defaultdict(set)
    for a in answers:
        prompts[(a["variant"], a["length"], a["depth"], a["sample"])].add(a["prompt_sha"])
        assert a["correct"] == score(a["answer"], tuple(a["values"].split(",")))
        assert a["art_mode"] == ("off" if a["art"] == "off" else "stability")
        key = a["config"].replace("+", "_").replace("=", "")
        assert grid[f"niah/{key}/{a['variant']}/{a['length']}/{a['depth']:g}"] == float(a["correct"])
    assert len(prompts) == len(variants) * len(lengths) * len(depths)
    assert all(len(shas) == 1 for shas in prompts.values())                    # identical across configs
    assert len({next(iter(s)) for s in prompts.values()}) == len(prompts)      # distinct across cells
    assert len(answers) == len(prompts) * len(configs)
    md = (out / "niah.md").read_text()
    assert sum(r[0] == "single" for r in markdown_rows(md)) == len(lengths) * len(depths)
    # per ART config: a Wilson interval around its accuracy, identical answers and the changed cases vs ART off
    by_config = defaultdict(list)
    for a in answers:
        by_config[a["config"]].append(a)
    changed = [json.loads(line) for line in (out / "changed.jsonl").read_text().splitlines()]
    for label, key in zip(configs, keys):
        low, high = m[f"accuracy_wilson_low/{key}"], m[f"accuracy_wilson_high/{key}"]
        assert low <= m[f"accuracy/{key}"] <= high and 0 < high - low < 1
        if label.endswith("/off"):
            continue
        off = by_config[label.split("/")[0] + "/off"]
        mine = by_config[label]
        assert m[f"identical_to_art_off/{key}"] == sum(x["answer"] == y["answer"] for x, y in zip(mine, off)) / len(mine)
        flipped = [x for x, y in zip(mine, off) if x["correct"] != y["correct"]]
        assert m[f"changed_vs_art_off/{key}"] == len(flipped) == sum(c["config"] == label for c in changed)
        assert m[f"needles_lost_vs_art_off/{key}"] == sum(not x["correct"] for x in flipped)
    # the frontier: one row per ART setting against its policy's ART off, and its plot
    frontier = {(r[0], r[1]): r for r in markdown_rows((out / "frontier.md").read_text()) if r[0] != "policy"}
    assert set(frontier) == {("dense", "tuned+block_size=16"), ("snapkv", "tuned+block_size=16")}
    for (policy, art), row in frontier.items():
        key = f"{policy}/{art}".replace("+", "_").replace("=", "")
        assert row[2] == "stability" and row[3] == f"{m[f'skipped_fraction/{key}']:.1%}"
        assert int(row[4]) == m[f"needles_lost_vs_art_off/{key}"]
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "frontier.png" in names


def test_wilson_interval_matches_the_formula():
    from pipelines.evaluation.niah import wilson_interval

    z = 1.959963984540054
    for k, n in ((30, 32), (0, 32), (32, 32), (5, 9)):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
        assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half), abs=1e-9)


# -- the issue's test: SmolLM2 through the endpoint, ART certified vs off ----------------------------


@pytest.mark.slow
def test_niah_through_the_endpoint_is_the_same_with_certified_art(tmp_path):
    os.environ.update({k: v for k, v in ENV.items() if k.startswith("RAY_")})
    import ray
    from ray import serve

    from workers.serving.replica import Replica

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": ENV}, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = dict(model="smollm2-135m", dtype="auto", device="cpu", max_context=2200, max_new_tokens=64,
                      threads=2)
        serve.run(Replica.options(num_replicas=1, health_check_timeout_s=120, ray_actor_options={"num_cpus": 1})
                  .bind(config, None, 4, 0.05), name="niah-test", route_prefix="/")
        t0 = time.perf_counter()
        cfg = ev.NiahConfig(endpoint=f"http://127.0.0.1:{port}", lengths=(1024, 2048), depths=(0.1, 0.5, 0.9),
                            variants=("single",), art=("off", "certified+eps=0.01"), batch=3,
                            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
        report = ev.run(cfg)
        seconds = time.perf_counter() - t0
        run_id = ev.log_mlflow(report, tmp_path / "out")
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    off = [r for r in report.rows if r.config == "dense/off"]
    art = [r for r in report.rows if r.config == "dense/certified+eps=0.01"]
    assert len(off) == len(art) == 6 and [r.prompt_sha for r in off] == [r.prompt_sha for r in art]
    assert {r.art_mode for r in off} == {"off"} and {r.art_mode for r in art} == {"certified"}
    assert sum(r.correct for r in off) >= 4, [(r.length, r.depth, r.answer) for r in off]   # not a vacuous comparison
    assert [r.correct for r in art] == [r.correct for r in off], [(r.answer, s.answer) for r, s in zip(art, off)]
    [s_off, s_art] = report.summaries
    assert s_art.accuracy == s_off.accuracy and s_art.agree == 1.0
    assert s_off.tokens_per_s > 0 and s_art.tokens_per_s > 0 and 0.0 <= s_art.skipped_fraction <= 1.0
    m = MlflowClient(cfg.tracking_uri).get_run(run_id).data.metrics
    assert m["accuracy/dense/off"] == m["accuracy/dense/certified_eps0.01"] == s_off.accuracy
    print(f"\nNIAH through the endpoint in {seconds:.0f} s: " + "; ".join(
        f"{s.config}: accuracy {s.accuracy:.3f}, {s.tokens_per_s:.1f} tokens/s, skipped {s.skipped_fraction:.1%}"
        for s in report.summaries))

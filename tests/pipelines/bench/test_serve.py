"""`sparta bench serve`: its arithmetic on hand-made samples, its argument errors (before anything is
deployed), and one small run against the tiny spec deployed on 127.0.0.1 in a process of its own."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipelines.bench import serve as bs
from pipelines.cli import app as cli
from tests.helpers import REPO, free_port, sparta
from tests.helpers import markdown_rows


def test_phase_order_and_split():
    assert bs.phase_order(("off", "on"), 3) == [("off", 0), ("on", 0), ("on", 1), ("off", 1), ("off", 2), ("on", 2)]
    assert [list(r) for r in bs.split(5, 2)] == [[0, 1], [2, 3, 4]]
    assert sum(len(r) for r in bs.split(7, 3)) == 7 and bs.split(1, 2) == [range(0, 1)]


def _sample(c, art, i, latency, tokens, ok=True, ttft=0.1, skipped=0.2):
    return bs.Sample(c, art, 0, i, 100, ok=ok, status=200 if ok else 500, latency_s=latency,
                     ttft_s=ttft if ok else None, output_tokens=tokens if ok else 0,
                     skipped_fraction=skipped if ok else None)


def test_summarize_recomputes_rows_and_ratios():
    lat_off, lat_on = [1.0, 2.0, 3.0, 10.0], [0.5, 1.0, 1.5]
    samples = ([_sample(1, "off", i, v, 10) for i, v in enumerate(lat_off)]
               + [_sample(1, "on", i, v, 8, skipped=0.1 * i) for i, v in enumerate(lat_on)]
               + [_sample(1, "on", 3, 0.0, 0, ok=False)])
    phases = [{"concurrency": 1, "art": "off", "round": 0, "requests": 4, "wall_s": 8.0},
              {"concurrency": 1, "art": "on", "round": 0, "requests": 4, "wall_s": 2.0},
              {"concurrency": 1, "art": "on", "round": 1, "requests": 0, "wall_s": 2.0}]
    off, on = bs.summarize(samples, phases)
    assert (off["requests"], off["errors"], on["requests"], on["errors"]) == (4, 0, 4, 1)
    assert off["requests_per_s"] == 4 / 8 and on["requests_per_s"] == 3 / 4
    assert off["output_tokens_per_s"] == 40 / 8 and on["output_tokens_per_s"] == 24 / 4
    assert off["latency_p50_s"] == np.percentile(lat_off, 50) == 2.5
    assert off["latency_p99_s"] == pytest.approx(np.percentile(lat_off, 99)) and on["latency_p50_s"] == 1.0
    assert on["skipped_fraction"] == pytest.approx(0.1) and on["mean_output_tokens"] == 8
    assert off["requests_per_s_ratio"] is None   # the baseline row
    assert on["requests_per_s_ratio"] == pytest.approx(0.75 / 0.5)
    assert on["output_tokens_per_s_ratio"] == pytest.approx(6 / 5) and on["latency_p50_s_ratio"] == pytest.approx(0.4)
    md = markdown_rows(bs.markdown([off, on]))
    assert len(md) == 3 and md[2][:8] == ["1", "on", "4", "1", "0.75", "6.0", "8.0", "1.00"] and "1.50x" in md[2]
    assert bs.percentile([], 50) is None


@pytest.mark.parametrize("args,option,message", [
    (["--concurrency", "1,x"], "--concurrency", "comma list of integers"),
    (["--concurrency", "4,0"], "--concurrency", "positive integers"),
    (["--art", "off,turbo"], "--art", "unknown ART preset 'turbo'; valid: paper, certified, tuned, aggressive"),
    (["--art", "off,off"], "--art", "distinct settings"),
    (["--max-tokens", "65"], "--max-tokens", "must be in [1, 64]"),
    (["--prompt-tokens", "500"], "--prompt-tokens", "max_context 512"),
    (["--requests", "0"], "--requests", "at least 1"),
])
def test_bad_arguments_exit_2_before_deploying(args, option, message, tmp_path, monkeypatch):
    def no_deploy(*a, **k):
        raise AssertionError("deployed despite a bad argument")

    monkeypatch.setattr(bs.Background, "start", no_deploy)
    monkeypatch.setattr(bs, "run", no_deploy)
    result = CliRunner().invoke(cli, ["bench", "serve", "--spec", str(REPO / "examples/serve-tiny.yaml"),
                                      "--prompt-tokens", "100", "--out", str(tmp_path / "out"), *args],
                                terminal_width=400)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert option in text and message in text, text
    assert not (tmp_path / "out").exists()


def test_on_needs_an_art_in_the_spec(tmp_path):
    spec = tmp_path / "off.yaml"
    spec.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "examples/serve-tiny.yaml").read_text()), "art": "off"}))
    with pytest.raises(bs.ConfigError, match="'on' means the spec's art, which is off"):
        bs.check(bs.BenchServeConfig(spec=str(spec), prompt_tokens=(100,)))
    _, arts = bs.check(bs.BenchServeConfig(spec=str(spec), prompt_tokens=(100,), art=("off", "tuned+tau=3e-3")))
    assert arts == {"off": "off", "tuned+tau=3e-3": "tuned+tau=3e-3"}


@pytest.mark.slow
def test_a_small_run_against_the_tiny_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "examples/serve-tiny.yaml").read_text()), "replicas": 1}))
    out, n = tmp_path / "out", 3
    done = sparta("bench", "serve", "--spec", str(spec), "--port", str(free_port()), "--concurrency", "1,2",
                   "--requests", str(n), "--prompt-tokens", "48,96", "--max-tokens", "4", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    with open(out / "serve-tiny.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["concurrency"], r["art"]) for r in rows] == [("1", "off"), ("1", "on"), ("2", "off"), ("2", "on")]
    for r in rows:
        assert int(r["requests"]) == n and int(r["errors"]) == 0 and float(r["output_tokens_per_s"]) > 0
        assert float(r["mean_output_tokens"]) <= 4
    report = json.loads((out / "serve-tiny.json").read_text())
    samples = [bs.Sample(**s) for s in report["samples"]]
    assert bs.summarize(samples, report["phases"]) == report["rows"]   # the table is the raw samples'
    assert {s.art for s in samples} == {"off", "on"} and all(s.ok and s.ttft_s for s in samples)
    on = [s for s in samples if s.art == "on"]
    assert all(0 <= s.skipped_fraction <= 1 for s in on)
    off = sorted((s.concurrency, s.index, s.prompt_tokens) for s in samples if s.art == "off")
    assert off == sorted((s.concurrency, s.index, s.prompt_tokens) for s in on)   # the same prompts
    assert "sparta bench serve" in done.stdout and (out / "serve-tiny.md").read_text().count("\n") == 6

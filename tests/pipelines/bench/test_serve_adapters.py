"""`sparta bench serve --adapters`: one merged adapter vs many mixed in one batch. Its arithmetic on hand-made
samples, its argument errors (before anything is made or deployed), and a small run against the tiny spec."""
from __future__ import annotations

import csv
import json

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.bench import serve_adapters as sa
from pipelines.bench import serve_open as so
from pipelines.cli import app as cli
from pipelines.serving.local import Background
from tests.helpers import REPO, free_port, sparta

TINY_SPEC = REPO / "examples/serve-tiny.yaml"


def sample(config: str, rate: float, i: int, tokens: int, latency: float, ttft: float) -> so.OpenSample:
    return so.OpenSample(config, "off", rate, 0, i, 32, tokens, arrival_s=i * 0.5, sent_s=i * 0.5,
                         done_s=i * 0.5 + latency, ok=True, status=200, latency_s=latency, ttft_s=ttft,
                         output_tokens=tokens)


def test_rows_ratios_and_verdicts_on_constructed_samples():
    cfg = sa.AdapterBenchConfig(spec=str(TINY_SPEC), rates=(1.0, 4.0), adapters=8)
    samples = []
    for rate in cfg.rates:   # per config: 2 requests of 11 tokens; latency (and so wall time) by config
        for config, latency in (("merged", 1.0), ("no adapter", 1.0), ("lora x1", 1.1), ("lora x8", 1.2),
                                ("cla x8", 1.6)):
            samples += [sample(config, rate, i, 11, latency, 0.1) for i in range(2)]
    rows = sa.summarize(cfg, samples)
    assert [(r["rate"], r["config"]) for r in rows] == [(rate, c) for rate in (1.0, 4.0) for c in
                                                        ("merged", "no adapter", "lora x1", "lora x8", "cla x8")]
    # wall = last done - first sent = 0.5 + latency; tokens/s = 22 / wall; TPOT = (latency - 0.1) / 10
    lora8 = rows[3]
    assert lora8["output_tokens_per_s"] == pytest.approx(22 / 1.7)
    assert lora8["output_tokens_per_s_vs_merged"] == pytest.approx(1.5 / 1.7)
    assert lora8["tpot_p50_s_vs_merged"] == pytest.approx(1.1 / 0.9)
    assert rows[0]["output_tokens_per_s_vs_merged"] is None   # merged itself
    verdicts = sa.verdicts(cfg, rows)
    assert [v["what"] for v in verdicts] == ["lora x8 vs merged, output tokens/s at 4 req/s",
                                             "cla x8 vs merged, output tokens/s at 4 req/s",
                                             "lora x8 vs no adapter (same deployment), output tokens/s at 4 req/s",
                                             "cla x8 vs no adapter (same deployment), output tokens/s at 4 req/s",
                                             "cla x8 vs lora x8, TPOT p50 at 4 req/s"]
    assert verdicts[0]["met"] is True and verdicts[1]["ratio"] == pytest.approx(1.5 / 2.1)
    assert verdicts[1]["met"] is False   # 0.71x < 0.8x
    assert verdicts[2]["ratio"] == pytest.approx(1.5 / 1.7) and verdicts[2]["met"] is None
    assert verdicts[4]["ratio"] == pytest.approx(1.5 / 1.1)


@pytest.mark.parametrize("args,option,message", [
    (["--adapters", "2"], "--adapters", "needs --rates"),
    (["--rates", "1", "--adapters", "0"], "--adapters", "at least 1"),
    (["--rates", "1", "--adapters", "2", "--adapter-methods", "lora,full"], "--adapter-methods",
     "distinct methods of lora, lora_plus"),
    (["--rates", "1", "--adapters", "2", "--schedulers", "static"], "--schedulers", "not with --adapters"),
    (["--rates", "1", "--adapters", "2", "--art", "off,on"], "--art", "one setting with --adapters"),
    (["--rates", "1", "--adapter-rank", "8"], "--adapter-rank", "only with --adapters"),
])
def test_bad_arguments_exit_2_before_making_anything(args, option, message, tmp_path, monkeypatch):
    def nothing(*a, **k):
        raise AssertionError("made adapters or deployed despite a bad argument")

    monkeypatch.setattr(Background, "start", nothing)
    monkeypatch.setattr(sa, "make_adapters", nothing)
    result = CliRunner().invoke(cli, ["bench", "serve", "--spec", str(TINY_SPEC), "--prompt-tokens", "100",
                                      "--max-tokens", "8", "--out", str(tmp_path / "out"), *args], terminal_width=400)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert option in text and message in text, text
    assert not (tmp_path / "out").exists()


def test_a_spec_with_adapters_is_refused(tmp_path):
    import adapters
    from workers.data.assets import load_model

    data = yaml.safe_load(TINY_SPEC.read_text())
    model, _ = load_model(data["model"], task="causal_lm", **data["model_overrides"])
    folder = adapters.apply(model, adapters.AdapterConfig(method="lora", rank=4)).save(tmp_path / "lora")
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**data, "adapters": [str(folder)]}))
    with pytest.raises(sa.ConfigError, match="give a spec of a base model"):
        sa.check(sa.AdapterBenchConfig(spec=str(spec), prompt_tokens=(32,), max_tokens=(8,)))


@pytest.mark.slow
def test_a_small_run_against_the_tiny_spec(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({**yaml.safe_load(TINY_SPEC.read_text()), "replicas": 1}))
    out = tmp_path / "out"
    done = sparta("bench", "serve", "--spec", str(spec), "--port", str(free_port()), "--rates", "4",
                  "--requests", "4", "--rounds", "1", "--adapters", "2", "--adapter-rank", "4",
                  "--prompt-tokens", "16,32", "--max-tokens", "4,8", "--out", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    with open(out / "serve-adapters-tiny.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == ["merged", "no adapter", "lora x1", "lora x2", "cla x2"]
    assert all(int(r["requests"]) == 4 and int(r["errors"]) == 0 and float(r["output_tokens_per_s"]) > 0 for r in rows)
    report = json.loads((out / "serve-adapters-tiny.json").read_text())
    samples = [so.OpenSample(**s) for s in report["samples"]]
    cfg = sa.AdapterBenchConfig(**{**report["config"], "rates": tuple(report["config"]["rates"]),
                                   "methods": tuple(report["config"]["methods"]),
                                   "prompt_tokens": tuple(report["config"]["prompt_tokens"]),
                                   "max_tokens": tuple(report["config"]["max_tokens"])})
    assert sa.summarize(cfg, samples) == report["rows"]   # the table is the raw samples'
    sent = {}
    for s in samples:
        sent.setdefault(s.scheduler, []).append((s.index, s.prompt_tokens, s.max_tokens))
    assert len({tuple(sorted(v)) for v in sent.values()}) == 1   # the same requests for every configuration
    assert report["deployments"]["merged"]["merge"] and report["deployments"]["adapters"]["adapters"] == 4
    assert [s["config"] for s in report["steps"]] == ["no adapter", "lora x1", "lora x2", "cla x2"]
    assert all(s["step_ms"] > 0 for s in report["steps"])
    assert "lora x2 vs merged, output tokens/s at 4 req/s" in done.stdout

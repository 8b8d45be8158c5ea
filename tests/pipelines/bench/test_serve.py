"""`sparta bench serve`: its arithmetic on hand-made samples, its argument errors (before anything is
deployed), and small runs against the tiny spec deployed on 127.0.0.1 in a process of its own: the closed
loop (--concurrency), the open loop (--rates, scheduler kinds side by side) and a SIGTERM mid-run."""
from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import psutil
import pytest
import yaml
from typer.testing import CliRunner

from pipelines.bench import serve as bs
from pipelines.bench import serve_open as so
from pipelines.cli import app as cli
from pipelines.serving.local import Background, DeploymentError, load_spec
from tests.helpers import REPO, free_port, sparta
from tests.helpers import markdown_rows

TINY_SPEC = REPO / "examples/serve-tiny.yaml"


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
    (["--art", "off,turbo"], "--art", "unknown ART preset 'turbo'; valid: paper, certified, tuned, aggressive, skip, walk"),
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


# -- the open loop (--rates) -----------------------------------------------------------------------

def test_the_workload_is_seeded_and_drawn_from_the_lists():
    a = so.workload(400, (128, 512, 1024), (16, 64), seed=3)
    assert a == so.workload(400, (128, 512, 1024), (16, 64), seed=3)   # the same for every configuration
    assert a != so.workload(400, (128, 512, 1024), (16, 64), seed=4)
    assert {x.prompt_tokens for x in a} == {128, 512, 1024} and {x.max_tokens for x in a} == {16, 64}
    assert [x.index for x in a] == list(range(400)) and all(0 <= x.prompt_start < 1 and x.gap > 0 for x in a)
    # lengths are drawn, not cycled: a cycle would repeat with period 3
    assert [x.prompt_tokens for x in a[:30]] != [[128, 512, 1024][i % 3] for i in range(30)]
    one, two = so.arrival_offsets(a, 1.0), so.arrival_offsets(a, 2.0)
    assert one[0] == 0.0 and two == pytest.approx([t / 2 for t in one])   # a rate only scales the gaps
    assert np.all(np.diff(one) > 0)


def test_arrivals_are_poisson_at_the_rate():
    n, rate = 4000, 2.0
    gaps = np.diff(so.arrival_offsets(so.workload(n, (128,), (16,), seed=0), rate))
    # The mean of n exponential gaps has standard error (1/rate)/sqrt(n) = 0.008 s: 5 of them is 0.04 s.
    assert abs(gaps.mean() - 1 / rate) < 5 * (1 / rate) / np.sqrt(n)
    # Exponential, not evenly spaced nor uniform: P(gap < mean) = 1 - 1/e = 0.632 (uniform: 0.5, fixed: 0 or 1);
    # its standard error is sqrt(0.632 * 0.368 / n) = 0.0076, 5 of them 0.038.
    below = np.mean(gaps < 1 / rate)
    assert abs(below - (1 - np.exp(-1))) < 5 * np.sqrt(0.632 * 0.368 / n)
    assert abs(gaps.std() / gaps.mean() - 1) < 0.1   # coefficient of variation 1


def test_every_configuration_sends_the_same_requests():
    cfg = so.OpenLoopConfig(spec="x", requests=6, prompt_tokens=(5, 9), max_tokens=(2, 3), rounds=2, probe_requests=2)
    load = so.build_workload(cfg, list(range(100)))
    assert load == so.build_workload(cfg, list(range(100)))
    assert [len(p) for p in load.prompts] == [a.prompt_tokens for a in load.arrivals]
    assert [len(p) for p in load.probe_short] == [so.PROBE_PROMPT] * 2 and len(load.probe_long) == 9
    part = bs.split(6, 2)[1]
    jobs = {(kind, art): so._phase_jobs("m", kind, 1.0, art, 1, art, part, load)
            for kind in ("continuous", "static") for art in ("off", "tuned")}
    strip = lambda js: [({k: v for k, v in b.items() if k != "art"}, s.index, s.arrival_s, s.max_tokens)  # noqa: E731
                        for b, s in js]
    first = strip(jobs["continuous", "off"])
    assert all(strip(js) == first for js in jobs.values())
    assert [j[1] for j in first] == [3, 4, 5] and first[0][2] == 0.0   # offsets from the part's first arrival
    b = jobs["static", "tuned"][0][0]
    assert b["art"] == "tuned" and b["temperature"] == 0 and b["stream"] is True
    assert b["stream_options"] == {"include_usage": True} and b["max_tokens"] == load.arrivals[3].max_tokens


def test_phase_plan_snakes_across_rates():
    assert so.phase_plan((1.0, 2.0), ("off", "on"), 1) == [(1.0, "off", 0), (1.0, "on", 0), (2.0, "on", 0),
                                                           (2.0, "off", 0)]
    assert so.phase_plan((1.0,), ("off", "on"), 2) == [(1.0, "off", 0), (1.0, "on", 0), (1.0, "on", 1),
                                                       (1.0, "off", 1)]


def test_the_open_loop_sends_at_arrival_times_up_to_the_cap():
    async def slow(request, sample):   # a server that takes 0.3 s per request
        await asyncio.sleep(0.3)
        sample.ok = True

    def jobs():
        return [({}, so.OpenSample("continuous", "off", 1.0, 0, i, 8, 8, arrival_s=0.05 * i)) for i in range(4)]

    free = jobs()
    asyncio.run(so.open_loop(slow, free, max_in_flight=10))
    for _, s in free:   # each goes at its time while the earlier ones are still unanswered
        assert s.arrival_s <= s.sent_s < s.arrival_s + 0.1 and not s.capped
        assert 0.3 <= s.done_s - s.sent_s < 0.45
    capped = jobs()
    asyncio.run(so.open_loop(slow, capped, max_in_flight=2))
    assert [s.capped for _, s in capped] == [False, False, True, True]
    assert capped[2][1].sent_s >= 0.3 and capped[3][1].sent_s >= 0.35   # held back until a slot freed


def test_the_probe_sends_each_short_request_behind_a_long_one():
    async def fake(request, sample):   # long: 0.4 s, short: 0.05 s, first token after 0.01 s
        took = 0.4 if request["max_tokens"] > 8 else 0.05
        await asyncio.sleep(took)
        sample.ok, sample.ttft_s, sample.latency_s, sample.output_tokens = True, 0.01, took, request["max_tokens"]

    def samples(kind, n=2):
        return [so.OpenSample("continuous", "off", 0.0, 0, i, 8, 8, kind=kind) for i in range(n)]

    unloaded, loaded, longs = samples(so.UNLOADED), samples(so.LOADED), samples(so.LONG)
    start = time.perf_counter()
    asyncio.run(so.probe_unloaded(fake, [{"max_tokens": 8}] * 2, unloaded))
    asyncio.run(so.probe_loaded(fake, [{"max_tokens": 8}] * 2, {"max_tokens": 64}, loaded, longs))
    assert time.perf_counter() - start >= 2 * 0.05 + 2 * 0.4   # one pair after the other
    for short, long in zip(loaded, longs):
        assert long.sent_s < 0.05 and so.PROBE_DELAY_S <= short.sent_s < so.PROBE_DELAY_S + 0.05
        assert long.done_s > short.sent_s   # still running when the short one went
    [row] = so.probe_rows(unloaded + loaded + longs)
    assert (row["requests"], row["errors"], row["overlapped"]) == (2, 0, 2)


def _open(kind, art, rate, i, latency, tokens, ttft=0.5, ok=True, status=200, sent=0.0, rnd=0, capped=False):
    return so.OpenSample(kind, art, rate, rnd, i, 100, 16, arrival_s=sent, sent_s=sent, done_s=sent + latency,
                         capped=capped, ok=ok, status=status, latency_s=latency if ok else 0.0,
                         ttft_s=ttft if ok else None, output_tokens=tokens if ok else 0)


def test_tpot_is_time_per_token_after_the_first():
    assert so.tpot(_open("static", "off", 1, 0, latency=2.5, tokens=11, ttft=0.5)) == pytest.approx(0.2)
    assert so.tpot(_open("static", "off", 1, 0, latency=2.5, tokens=1)) is None
    assert so.tpot(_open("static", "off", 1, 0, latency=2.5, tokens=5, ok=False)) is None


def test_open_loop_summary_on_constructed_samples():
    samples = [
        # static, off, rate 1: two rounds, walls 3 + 2 s; one 503 and one other error in round 1
        _open("static", "off", 1, 0, latency=2.0, tokens=11, ttft=1.0, sent=0.0),
        _open("static", "off", 1, 1, latency=2.0, tokens=21, ttft=0.0, sent=1.0),
        _open("static", "off", 1, 2, latency=1.0, tokens=5, ttft=0.2, sent=0.5, rnd=1),
        _open("static", "off", 1, 3, latency=0.0, tokens=0, ok=False, status=503, sent=1.0, rnd=1),
        _open("static", "off", 1, 4, latency=1.5, tokens=0, ok=False, status=500, sent=1.0, rnd=1, capped=True),
        # continuous, off, rate 1: wall 1 s
        _open("continuous", "off", 1, 0, latency=1.0, tokens=30, ttft=0.1),
        _open("continuous", "off", 1, 1, latency=0.5, tokens=10, ttft=0.05, sent=0.5),
        # continuous, on, rate 1: wall 2 s
        _open("continuous", "on", 1, 0, latency=2.0, tokens=30, ttft=0.1),
        # probe samples are not load rows
        so.OpenSample("static", "off", 0.0, 0, 0, 128, 8, kind=so.UNLOADED, ok=True, latency_s=1, ttft_s=0.1,
                      output_tokens=8),
    ]
    rows = so.summarize(samples)
    assert [(r["rate"], r["scheduler"], r["art"]) for r in rows] == [(1, "static", "off"), (1, "continuous", "off"),
                                                                     (1, "continuous", "on")]
    static, cont, cont_on = rows
    assert (static["requests"], static["errors"], static["rejected_503"], static["capped"]) == (5, 2, 1, 1)
    assert static["wall_s"] == pytest.approx(3.0 + 2.0)   # first send to last answer, per round
    assert static["output_tokens_per_s"] == pytest.approx(37 / 5)
    tpots = [(2.0 - 1.0) / 10, (2.0 - 0.0) / 20, (1.0 - 0.2) / 4]
    assert static["tpot_p50_s"] == pytest.approx(np.percentile(tpots, 50)) == pytest.approx(0.1)
    assert static["tpot_p99_s"] == pytest.approx(np.percentile(tpots, 99))
    assert static["ttft_p50_s"] == pytest.approx(0.2)
    assert static["ttft_p99_s"] == pytest.approx(np.percentile([1, 0, .2], 99))
    assert static["latency_p50_s"] == pytest.approx(2.0) and static["latency_p99_s"] == pytest.approx(2.0)
    assert cont["output_tokens_per_s"] == pytest.approx(40 / 1.0) and cont_on["output_tokens_per_s"] == 15
    # continuous vs static at the same rate and ART; on vs off at the same scheduler and rate
    assert cont["output_tokens_per_s_vs_scheduler"] == pytest.approx(40 / (37 / 5))
    assert cont["latency_p99_s_vs_scheduler"] == pytest.approx(np.percentile([1.0, 0.5], 99) / 2.0)
    assert static["output_tokens_per_s_vs_scheduler"] is None and cont_on["output_tokens_per_s_vs_scheduler"] is None
    assert cont_on["output_tokens_per_s_vs_art"] == pytest.approx(15 / 40)
    assert cont["output_tokens_per_s_vs_art"] is None
    assert static["sustained"] is False and cont["sustained"] is True   # static had errors


def _rows(kind, art, rates, p99s, errors=None, tok=None, served=None):
    n = len(rates)
    errors, tok, served = errors or [0] * n, tok or [10.0] * n, served or [1.0] * n
    return [{"scheduler": kind, "art": art, "rate": r, "latency_p99_s": p, "errors": e, "output_tokens_per_s": t,
             "served_vs_offered": v} for r, p, e, t, v in zip(rates, p99s, errors, tok, served)]


def test_the_sustain_rule():
    rows = (_rows("static", "off", [2.0, 0.5, 1.0, 4.0], [3.0, 1.0, 2.0, 1.5],   # 4: back under 2x, but 2 failed
                  served=[0.5, 0.85, 0.9, 0.3])   # and 2 fell behind its arrivals
            + _rows("static", "on", [0.5, 1.0, 2.0], [1.0, 1.5, 2.5], errors=[0, 1, 0])
            + _rows("continuous", "off", [0.5, 1.0, 2.0, 4.0], [1.0, 1.0, 1.2, 1.9], tok=[10.0, 15.0, 30.0, 40.0])
            + _rows("static", "tuned", [0.5, 1.0], [None, 1.0], errors=[3, 0]))   # no reference at all
    so.mark_sustained(rows)
    held = {(r["scheduler"], r["art"], r["rate"]): r["sustained"] for r in rows}
    assert [held["static", "off", r] for r in (0.5, 1.0, 2.0, 4.0)] == [True, True, False, False]
    assert [held["static", "on", r] for r in (0.5, 1.0, 2.0)] == [True, False, False]
    assert all(held["continuous", "off", r] for r in (0.5, 1.0, 2.0, 4.0))
    assert not held["static", "tuned", 0.5] and not held["static", "tuned", 1.0]
    assert so.static_sustains(rows) == [
        # 15 / 10 at rate 1; at 2, the first rate static loses, 30 / 10
        {"art": "off", "rate": 1.0, "continuous_vs_static_tokens_per_s": 1.5, "continuous_rate": 4.0,
         "beyond_rate": 2.0, "continuous_vs_static_tokens_per_s_beyond": 3.0},
        {"art": "on", "rate": 0.5, "continuous_vs_static_tokens_per_s": None, "continuous_rate": None,   # no continuous row
         "beyond_rate": 1.0, "continuous_vs_static_tokens_per_s_beyond": None},
        {"art": "tuned", "rate": None, "continuous_vs_static_tokens_per_s": None, "continuous_rate": None,
         "beyond_rate": 0.5, "continuous_vs_static_tokens_per_s_beyond": None}]
    # a server that falls behind its arrivals sustains nothing from there on, however its latency looks
    behind = _rows("static", "off", [0.5, 1.0, 2.0], [1.0, 1.1, 1.2], served=[1.0, 0.7, 1.0])
    so.mark_sustained(behind)
    assert [r["sustained"] for r in behind] == [True, False, False]


def test_served_vs_offered_uses_the_drawn_arrivals():
    # 3 requests due at 0, 1 and 4 s (2 gaps in 4 s: 0.5 req/s offered, whatever the nominal rate), the last
    # answered at 5 s: 3 / 5 = 0.6 req/s served
    samples = [_open("static", "off", 1.0, i, latency=1.0, tokens=4, sent=t) for i, t in enumerate([0.0, 1.0, 4.0])]
    [row] = so.summarize(samples)
    assert row["offered_requests_per_s"] == pytest.approx(0.5) and row["requests_per_s"] == pytest.approx(0.6)
    assert row["served_vs_offered"] == pytest.approx(1.2)
    assert so.offered_rate(samples[:1], 1.0) == 1.0   # one request: the nominal rate


def test_the_sustain_rule_end_to_end():
    # continuous / static tokens/s at the highest rate static sustains, from samples
    samples = []
    for kind, lat in (("static", {0.5: 1.0, 1.0: 1.8, 2.0: 5.0}), ("continuous", {0.5: 1.0, 1.0: 1.0, 2.0: 1.1})):
        for rate, latency in lat.items():
            samples += [_open(kind, "off", rate, i, latency=latency, tokens=10 if kind == "static" else 20,
                              ttft=0.1, sent=i / rate) for i in range(4)]
    rows = so.summarize(samples)
    [verdict] = so.static_sustains(rows)
    static_1 = next(r for r in rows if (r["scheduler"], r["rate"]) == ("static", 1.0))
    cont_1 = next(r for r in rows if (r["scheduler"], r["rate"]) == ("continuous", 1.0))
    assert verdict["rate"] == 1.0
    assert verdict["continuous_vs_static_tokens_per_s"] == pytest.approx(
        cont_1["output_tokens_per_s"] / static_1["output_tokens_per_s"])
    assert static_1["output_tokens_per_s"] == pytest.approx(40 / (3 + 1.8))


def test_interference_rows():
    samples = []
    unloaded, loaded = [0.10, 0.12, 0.11, 0.30], [0.15, 0.20, 0.50, 0.25]
    for i, (u, lo) in enumerate(zip(unloaded, loaded)):
        samples += [so.OpenSample("continuous", "off", 0.0, 0, i, 128, 8, kind=so.UNLOADED, ok=True, latency_s=1,
                                  ttft_s=u, output_tokens=8),
                    so.OpenSample("continuous", "off", 0.0, 0, i, 128, 8, kind=so.LOADED, ok=True, latency_s=1,
                                  ttft_s=lo, output_tokens=8, sent_s=0.1),
                    # the third long one ended before its short one was sent: not overlapped
                    so.OpenSample("continuous", "off", 0.0, 0, i, 400, 0, kind=so.LONG, ok=True, latency_s=1,
                                  ttft_s=0.1, output_tokens=16, done_s=0.05 if i == 2 else 0.2)]
    [row] = so.probe_rows(samples)
    assert row["unloaded_ttft_p99_s"] == pytest.approx(np.percentile(unloaded, 99))
    assert row["loaded_ttft_p99_s"] == pytest.approx(np.percentile(loaded, 99))
    assert row["loaded_vs_unloaded_p99"] == pytest.approx(np.percentile(loaded, 99) / np.percentile(unloaded, 99))
    assert row["target_met"] is (row["loaded_vs_unloaded_p99"] <= 2.0) and row["target_met"] is True
    assert (row["requests"], row["errors"], row["overlapped"], row["long_prompt_tokens"]) == (4, 0, 3, 400)


def _report(samples, cfg=None):
    rows = so.summarize(samples)
    return so.OpenReport(cfg or so.OpenLoopConfig(spec="x"), {}, "m", rows, so.probe_rows(samples),
                         so.static_sustains(rows), samples, [])


def test_open_loop_markdown():
    samples = [_open(kind, art, rate, 0, latency=1.0 + (kind == "static"), tokens=10, sent=0.0)
               for rate in (0.5, 1.0) for kind in ("continuous", "static") for art in ("off", "on")]
    md = markdown_rows(so.markdown(_report(samples)))
    assert md[0][:3] == ["rate /s", "scheduler", "ART"] and len(md) == 1 + 8
    # one request answered in 1 s at 0.5 req/s: served / offered 2.00
    assert md[1][:9] == ["0.5", "continuous", "off", "1", "0", "0", "0", "2.00", "10.0"]
    cont_on = md[2]
    # 10 tokens in 1 s (continuous) vs 2 s (static)
    assert cont_on[md[0].index("tok/s vs static")] == "2.00x" and cont_on[md[0].index("p99 vs static")] == "0.50x"
    assert md[3][md[0].index("tok/s vs static")] == "-" and md[1][md[0].index("TPOT p50 ms")] == "55.6"
    text = so.markdown(_report(samples))
    # static answers in 2 s: at 1 req/s it serves 0.5x what arrives, so it sustains 0.5 req/s only
    assert "ART off: static sustains up to 0.5 req/s; continuous / static output tokens/s there: 2.00x" in text
    assert "ART off: continuous sustains up to 1 req/s" in text
    assert "ART off: at 1 req/s, the first rate static does not sustain, continuous / static output tokens/s: 2.00x" in text
    assert "its arrival rate" not in text   # served / offered 2.00 and 1.00 at the lowest rate: light enough
    slow = [_open("static", "off", 1.0, i, latency=5.0, tokens=10, sent=float(i)) for i in range(3)]
    assert "static, ART off: the lowest rate (1/s) answered 0.43x its arrival rate" in so.markdown(_report(slow))


@pytest.mark.parametrize("args,option,message", [
    (["--rates", "0"], "--rates", "positive request rates"),
    (["--rates", "1,x"], "--rates", "comma list of numbers"),
    (["--rates", "1,1"], "--rates", "distinct rates"),
    (["--rates", "1", "--schedulers", "fast"], "--schedulers", "distinct kinds of continuous, static"),
    (["--rates", "1", "--prompt-tokens", "100,500", "--max-tokens", "8,16"], "--prompt-tokens",
     "500 + the largest max tokens 16 must fit the spec's max_context 512"),
    (["--rates", "1", "--max-tokens", "8,65"], "--max-tokens", "must be in [1, 64]"),
    (["--rates", "1", "--max-in-flight", "0"], "--max-in-flight", "at least 1"),
    (["--rates", "1", "--art", "off,turbo"], "--art", "unknown ART preset 'turbo'"),
    (["--rates", "1", "--endpoint", "http://127.0.0.1:9"], "--schedulers", "one scheduler kind"),
    (["--rates", "1", "--concurrency", "1"], "--concurrency", "not both"),
    (["--interference"], "--interference", "only with --rates"),
    (["--schedulers", "static"], "--schedulers", "only with --rates"),
    (["--max-tokens", "8,16"], "--max-tokens", "the closed loop takes one value"),
])
def test_open_loop_bad_arguments_exit_2_before_deploying(args, option, message, tmp_path, monkeypatch):
    def no_deploy(*a, **k):
        raise AssertionError("deployed despite a bad argument")

    monkeypatch.setattr(Background, "start", no_deploy)
    monkeypatch.setattr(so, "run", no_deploy)
    monkeypatch.setattr(bs, "run", no_deploy)
    result = CliRunner().invoke(cli, ["bench", "serve", "--spec", str(TINY_SPEC), "--prompt-tokens", "100",
                                      "--max-tokens", "8", "--out", str(tmp_path / "out"), *args], terminal_width=400)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert option in text and message in text, text
    assert not (tmp_path / "out").exists()


def test_a_spec_that_does_not_run_as_a_kind_exits_2(tmp_path):
    spec = tmp_path / "tight.yaml"   # fine for continuous; static batches of 4 need 4 ongoing requests
    spec.write_text(yaml.safe_dump({**yaml.safe_load(TINY_SPEC.read_text()), "max_ongoing_requests": 2}))
    with pytest.raises(bs.ConfigError,
                       match="(?s)does not run with scheduler.kind static.*max_ongoing_requests .2. must be >="):
        so.check(so.OpenLoopConfig(spec=str(spec), prompt_tokens=(100,), max_tokens=(8,)))
    specs, _ = so.check(so.OpenLoopConfig(spec=str(spec), schedulers=("continuous",), prompt_tokens=(100,),
                                          max_tokens=(8,)))
    assert specs["continuous"].scheduler.kind == "continuous"


def test_the_scheduler_override_keeps_the_rest_of_the_section(tmp_path, monkeypatch):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**yaml.safe_load(TINY_SPEC.read_text()),
                                    "scheduler": {"kind": "continuous", "max_prefill_tokens": 64, "max_queued": 3}}))
    static = load_spec(spec, scheduler="static")
    kept = (static.scheduler.kind, static.scheduler.max_prefill_tokens, static.scheduler.max_queued)
    assert kept == ("static", 64, 3)
    assert load_spec(spec).scheduler.kind == "continuous" and load_spec(spec, port=9).port == 9
    bad = CliRunner().invoke(cli, ["serve", "run", str(spec), "--scheduler", "fast"])
    assert bad.exit_code == 2 and "valid: continuous, static" in bad.output

    seen = []

    class Exited:   # a `serve run` that exits at once: Background.start reports it
        def __init__(self, argv, **kwargs):
            seen.append(argv)
            self.pid, self.returncode = 1, 2

        def poll(self):
            return self.returncode

    monkeypatch.setattr("pipelines.serving.local.subprocess.Popen", Exited)
    with pytest.raises(DeploymentError):
        Background.start(spec, tmp_path / "state.json", tmp_path / "log", port=9, timeout_s=5, scheduler="static")
    assert seen[0][-4:] == ["--port", "9", "--scheduler", "static"] and str(spec.resolve()) in seen[0]


@pytest.mark.slow
def test_a_small_open_loop_run_against_the_tiny_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({**yaml.safe_load(TINY_SPEC.read_text()), "replicas": 1}))
    out, n = tmp_path / "out", 4
    done = sparta("bench", "serve", "--spec", str(spec), "--port", str(free_port()), "--rates", "2,4",
                  "--requests", str(n), "--rounds", "1", "--prompt-tokens", "32,64", "--max-tokens", "4,8",
                  "--interference", "--probe-requests", "2", "--out", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    with open(out / "serve-open-tiny.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["rate"], r["scheduler"], r["art"]) for r in rows] == [
        (rate, kind, art) for rate in ("2.0", "4.0") for kind in ("continuous", "static") for art in ("off", "on")]
    for r in rows:
        assert int(r["requests"]) == n and int(r["errors"]) == 0 and float(r["output_tokens_per_s"]) > 0
    report = json.loads((out / "serve-open-tiny.json").read_text())
    samples = [so.OpenSample(**s) for s in report["samples"]]
    assert so.summarize(samples) == report["rows"]   # the table is the raw samples'
    assert so.probe_rows(samples) == report["probe"] and so.static_sustains(report["rows"]) == report["sustains"]
    load = [s for s in samples if s.kind == so.LOAD]
    assert all(s.ok and s.ttft_s and s.output_tokens <= s.max_tokens for s in load)
    sent: dict[tuple, list] = {}
    for s in load:
        sent.setdefault((s.scheduler, s.art, s.rate), []).append((s.index, s.prompt_tokens, s.max_tokens))
    assert len(sent) == 8 and len({tuple(sorted(v)) for v in sent.values()}) == 1   # the same requests everywhere
    assert [p["scheduler"] for p in report["probe"]] == ["continuous", "static"]
    assert all(p["requests"] == 2 and p["errors"] == 0 and p["loaded_ttft_p99_s"] > 0 for p in report["probe"])
    assert report["environment"]["cpu"]
    for kind, deployed in report["deployments"].items():   # the override took (where /healthz says)
        assert deployed["healthz"].get("status") == "ok" and deployed["healthz"].get("scheduler", kind) == kind
    assert (out / "serve-continuous.log").exists() and (out / "serve-static.log").exists()
    assert "sparta bench serve (open loop)" in done.stdout and "prefill interference" in done.stdout


def _serve_runs(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if "serve" in p.cmdline() and "run" in p.cmdline()]


def _ray_started(pid: int) -> bool:
    """The bench's `serve run` has started processes of its own (its local Ray)."""
    try:
        return any(p.children() for p in _serve_runs(pid))
    except psutil.NoSuchProcess:
        return False


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _port_free(port: int) -> bool:
    from pipelines.serving.deploy import check_port_free
    from pipelines.serving.spec import ServeSpecError

    try:
        check_port_free("127.0.0.1", port)
    except ServeSpecError:
        return False
    return True


def _until(probe, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(0.5)
    return probe()


@pytest.mark.slow
@pytest.mark.parametrize("when", ["deploying", "driving"])
def test_sigterm_stops_the_deployment(when, tmp_path):
    """SIGTERM to `sparta bench serve` while its deployment comes up or while it drives it: the background
    `serve run` and every process it started (its Ray, the HTTP proxy) are gone and the port is free."""
    spec, port = tmp_path / "tiny.yaml", free_port()
    spec.write_text(yaml.safe_dump({**yaml.safe_load(TINY_SPEC.read_text()), "replicas": 1}))
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    argv = [sys.executable, "-m", "pipelines.cli", "bench", "serve", "--spec", str(spec), "--port", str(port),
            "--rates", "0.2", "--requests", "40", "--rounds", "1", "--schedulers", "continuous", "--prompt-tokens",
            "32", "--max-tokens", "4", "--out", str(tmp_path / "out")]
    with open(tmp_path / "bench.log", "w") as log:
        bench = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    started: list[psutil.Process] = []
    try:
        if when == "deploying":
            assert _until(lambda: _ray_started(bench.pid), 180), (tmp_path / "bench.log").read_text()[-3000:]
        else:
            up = _until(lambda: _answers(f"http://127.0.0.1:{port}"), 300)
            assert up, (tmp_path / "bench.log").read_text()[-3000:]
            time.sleep(5)   # past the warm-up: phases running
        started = psutil.Process(bench.pid).children(recursive=True)
        assert _serve_runs(bench.pid) and bench.poll() is None
        bench.send_signal(signal.SIGTERM)
        bench.wait(150)
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, f"still running after the bench exited: {[(p.pid, p.name()) for p in alive]}"
        assert _until(lambda: _port_free(port), 10), f"port {port} still taken"
    finally:   # only what this test started, by PID
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        for p in started:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

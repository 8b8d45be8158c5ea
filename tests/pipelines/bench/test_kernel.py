"""`sparta bench kernel`: the synthetic scores are what it says, every row's output is attention, the ratios are
the measured times', and bad options are refused before anything runs."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from typer.testing import CliRunner

from pipelines.bench import kernel as bk
from pipelines.cli import app as cli


def test_synthetic_scores_have_the_stated_shape():
    q, k, v = bk.synthetic_batch(2, 2048, "smollm2-135m", torch.float32, "cpu", 0, sink_nats=10.0, recent_nats=4.0)
    assert q.shape == (2, 9, 64) and k.shape == v.shape == (2, 3, 2048, 64)
    scores = torch.einsum("bkgd,bktd->bkgt", q.view(2, 3, 3, 64), k) / math.sqrt(64)
    background = scores[..., 4:-8]
    assert background.std().item() == pytest.approx(1.0, abs=0.1)
    # sinks and the newest positions sit about their nats above the background (the query's own noise blurs them)
    assert (scores[..., :4].mean() - background.mean()).item() == pytest.approx(10.0, rel=0.15)
    assert (scores[..., -8:].mean() - background.mean()).item() == pytest.approx(4.0, rel=0.15)


def test_a_cell_times_every_row_and_its_ratios_are_the_times():
    cfg = bk.KernelBenchConfig(contexts=(512,), batches=(2,), art=("tuned", "aggressive"), device="cpu",
                               dtype="float32", rounds=1, reps=2)
    rows = bk.run(cfg)
    by = {r.row: r for r in rows}
    assert list(by) == [bk.SDPA, bk.WALK_ALL, "tuned", "aggressive"]
    for r in rows:
        assert r.ms_p50 > 0
        assert r.vs_sdpa == pytest.approx(by[bk.SDPA].ms_p50 / r.ms_p50)
        assert r.vs_walk_all == pytest.approx(by[bk.WALK_ALL].ms_p50 / r.ms_p50)
    # walking every block is exact attention; aggressive stops early here and pays with error
    assert by[bk.WALK_ALL].visited == 1.0 and by[bk.WALK_ALL].rel_error < 1e-5
    assert by["aggressive"].visited < 1.0 and by["aggressive"].rel_error > by[bk.WALK_ALL].rel_error
    assert 0 < by["tuned"].visited <= 1.0
    verdicts = bk.verdicts(rows)   # one per preset, met when its skipping pays against walk-all
    assert [v.target.split(" at ")[0] for v in verdicts] == ["tuned", "aggressive"]
    assert [v.met for v in verdicts] == [by[r].vs_walk_all >= bk.TARGET_VS_WALK_ALL for r in ("tuned", "aggressive")]


def test_kept_and_per_call_summaries_decide_alike():
    """Both ways of making the summaries give a row each; the same blocks are visited and the outputs agree."""
    ranked = "aggressive+order=bound+score_bound=box+ball+block_size=32"   # key balls rank; it stops early
    certified = "certified+eps=1e-2+certificate=relative+score_bound=box+ball+block_size=32"   # and value balls
    cfg = bk.KernelBenchConfig(contexts=(1024,), batches=(2,), art=(ranked, certified), device="cpu",
                               dtype="float32", rounds=1, reps=1, summaries=("kept", "per-call"))
    by = {r.row: r for r in bk.run(cfg)}
    assert list(by) == [bk.SDPA, bk.WALK_ALL] + [f"{a} [{how}]" for a in (ranked, certified) for how in bk.SUMMARIES]
    for art in (ranked, certified):
        kept, per_call = by[f"{art} [kept]"], by[f"{art} [per-call]"]
        assert kept.visited == per_call.visited
        assert kept.rel_error == pytest.approx(per_call.rel_error, rel=1e-3, abs=1e-7)
    assert by[f"{ranked} [kept]"].visited < 0.5
    q, k, v = bk.synthetic_batch(1, 300, "smollm2-135m", torch.float32, "cpu", 0, 10.0, 4.0)
    made = bk.kept_summaries(k, v, bk.parse_art(certified))
    assert set(made) == {"key_bounds", "balls"} and made["balls"][0].shape == (1, 3, 10, 64)
    assert bk.kept_summaries(k, v, bk.parse_art("paper")) == {}   # recency order: nothing to keep


def test_the_cli_writes_its_report(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "kernel", "--contexts", "256", "--batch", "1", "--device", "cpu",
                                      "--dtype", "float32", "--art", "certified", "--rounds", "1", "--reps", "1",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "kernel-cpu.json").read_text())
    assert [r["row"] for r in record["rows"]] == ["sdpa", "walk-all", "certified"]
    assert record["environment"]["kernel"] in ("cpu", "reference")
    assert re.search(r"\|\s+certified\s+\|", (tmp_path / "kernel-cpu.md").read_text())


@pytest.mark.parametrize("args,option,message", [
    (["--shape", "gpt5"], "--shape", "valid: smollm2-135m"),
    (["--dtype", "float16"], "--dtype", "valid: float32, bfloat16"),
    (["--art", "fastest"], "--art", "unknown ART preset 'fastest'"),
    (["--batch", "0"], "--batch", "positive integers"),
    (["--summaries", "cached"], "--summaries", "valid: kept, per-call"),
])
def test_bad_options_name_the_option_and_the_choices(args, option, message, tmp_path):
    result = CliRunner().invoke(cli, ["bench", "kernel", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert option in result.output and message in result.output
    assert not list(tmp_path.iterdir())

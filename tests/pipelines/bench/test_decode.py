"""`sparta bench decode` on a tiny random Llama: rows, ratios and tokens consistent, files written,
arguments refused before anything loads."""
import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from attention import ARTConfig
from attention.config import parse_art
from pipelines.bench import decode as bd
from pipelines.cli import app
from tests.helpers import markdown_rows

TRUNCATING = ARTConfig(tau=1.0, phi=1.0, patience=1, min_blocks=1, block_size=16)
ROWS = ["stock", "dense/off", "dense/custom", "dense/walk", "snapkv/off", "snapkv/custom", "snapkv/walk"]


@pytest.fixture(scope="module")
def run():
    cfg = bd.BenchDecodeConfig(model="random:llama-tiny", policies=("dense", "snapkv"), contexts=(256, 320),
                               batches=(1, 4), art=(TRUNCATING, "walk"), prompts=2, new_tokens=5, rounds=2,
                               dtype="float32")
    model, tok = bd.load(cfg)
    impl = model.config._attn_implementation
    seen = []
    report = bd.run(cfg, lambda msg, i, n: seen.append((msg, i, n)), model=model, tokenizer=tok)
    return cfg, model, impl, report, seen


def test_every_row_is_measured_in_order(run):
    cfg, model, impl, report, seen = run
    assert [(r.context, r.batch, r.row) for r in report.results] == [
        (c, b, row) for c in (256, 320) for b in (1, 4) for row in ROWS]
    for r in report.results:
        assert r.steps == cfg.rounds * (cfg.new_tokens - 2)        # each round's first decode step skipped
        assert r.decode_steps == cfg.rounds * (cfg.new_tokens - 1)
        assert r.tokens_per_s == pytest.approx(r.batch / (r.step_ms / 1e3))
        assert 0 < r.attention_ms <= r.step_ms and r.attention_seconds > 0   # attention is part of a step
        assert r.passkey_correct is None and r.passkey_total is None   # random tokens: no passkeys
    assert model.config._attn_implementation == impl and not hasattr(model, "art_stats")   # restored
    assert set(report.prefill_seconds) == {"256/dense", "256/snapkv", "320/dense", "320/snapkv"}
    # progress: one prefill per (context, policy), one call per (row, round), counted against one total
    totals = {n for _, _, n in seen}
    assert totals == {2 * (2 + 2 * 2 * len(ROWS))}
    assert sum("prefill" in m for m, _, _ in seen) == 4 and any("round 2/2: snapkv/custom" in m for m, _, _ in seen)


def test_art_off_visits_everything_and_speedups_are_off_over_on(run):
    _, _, _, report, _ = run
    by = {(r.context, r.batch, r.row): r for r in report.results}
    for (c, b, row), r in by.items():
        if row.endswith("/off"):
            assert r.visited_fraction == 1.0 and r.attention_speedup is None and r.tokens_speedup is None
        elif row.endswith("/custom"):
            off = by[(c, b, row.split("/")[0] + "/off")]
            assert r.attention_speedup == pytest.approx(off.attention_ms / r.attention_ms)
            assert r.tokens_speedup == pytest.approx(r.tokens_per_s / off.tokens_per_s)
            assert r.visited_fraction < 1.0   # the truncating setting stops early
            walk = by[(c, b, row.split("/")[0] + "/walk")]
            assert r.attention_vs_walk == pytest.approx(walk.attention_ms / r.attention_ms)
            assert r.tokens_vs_walk == pytest.approx(r.tokens_per_s / walk.tokens_per_s)
        elif row.endswith("/walk"):   # the kernel visiting every block: a baseline, compared with off only
            assert r.visited_fraction == 1.0 and r.attention_vs_walk is None and r.tokens_speedup is not None
        else:
            assert r.visited_fraction is None and r.policy == "-"


def test_tokens_stock_equals_dense_off_and_batches_repeat_prompts(run):
    cfg, _, _, report, _ = run
    by = {(r.context, r.batch, r.row): r for r in report.results}
    for c in cfg.contexts:
        for b in cfg.batches:
            stock, dense = report.tokens[(c, b, "stock")], report.tokens[(c, b, "dense/off")]
            assert stock.shape == (b, cfg.new_tokens) and torch.equal(stock, dense)
            assert by[(c, b, "stock")].seqs_differ == 0
            # off rows are their own reference; ART rows count sequences unlike their policy's off row
            assert by[(c, b, "dense/off")].seqs_differ is None
            custom = report.tokens[(c, b, "dense/custom")]
            assert by[(c, b, "dense/custom")].seqs_differ == int((custom != dense).any(-1).sum())
        four = report.tokens[(c, 4, "dense/off")]
        assert torch.equal(four[:2], four[2:]) and torch.equal(four[:1], report.tokens[(c, 1, "dense/off")])
    assert report.warnings == []


def test_verdicts_at_the_biggest_context_and_batches_from_4(run):
    _, _, _, report, _ = run
    verdicts = bd.verdicts(report)
    assert [v.target for v in verdicts] == ["custom on dense, 320 tokens, batch 4",
                                            "custom on dense, 320 tokens, batch 4, vs walk",
                                            "custom on snapkv, 320 tokens, batch 4",
                                            "custom on snapkv, 320 tokens, batch 4, vs walk"]
    on = next(r for r in report.results if (r.context, r.batch, r.row) == (320, 4, "dense/custom"))
    assert verdicts[0].met == (on.attention_speedup >= 1.4 and on.tokens_speedup >= 1.2)
    assert verdicts[1].met == (on.attention_vs_walk >= 1.4 and on.tokens_vs_walk >= 1.2)


def test_passkey_hits_count_each_distinct_prompt_once():
    class Tok:
        def decode(self, t):
            return "".join(str(int(x)) for x in t)

    tokens = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 2, 3], [0, 0, 0]])
    assert bd.passkey_hits(Tok(), tokens, ["123", "999"]) == (1, 2)      # rows 2, 3 repeat prompts 0, 1
    assert bd.passkey_hits(Tok(), tokens[:1], ["123", "999"]) == (1, 1)  # batch 1: only prompt 0
    assert bd.passkey_hits(None, tokens, None) == (None, None)
    assert bd.depths(1) == [0.5] and bd.depths(5) == [0.1, 0.3, 0.5, 0.7, 0.9]


def test_config_errors_name_the_field_and_choices():
    with pytest.raises(bd.ConfigError, match="unknown policy 'tova'; valid: dense, streaming") as e:
        bd.BenchDecodeConfig(policies=("dense", "tova"))
    assert e.value.field == "policies"
    with pytest.raises(bd.ConfigError, match="unknown ART preset 'nope'; valid: paper") as e:
        bd.BenchDecodeConfig(art=("nope",))
    assert e.value.field == "art"
    for kw in (dict(batches=(0,)), dict(contexts=()), dict(new_tokens=2), dict(policy_ratio=1.0), dict(rounds=0)):
        with pytest.raises(bd.ConfigError):
            bd.BenchDecodeConfig(**kw)


def test_cli_writes_csv_markdown_metadata_and_plot(tmp_path):
    out = tmp_path / "decode.csv"
    result = CliRunner().invoke(app, ["bench", "decode", "--model", "random:llama-tiny", "--policies", "dense",
                                      "--contexts", "256", "--batch", "1,2", "--art", "paper", "--prompts", "2",
                                      "--new-tokens", "3", "--rounds", "1", "--dtype", "float32",
                                      "--csv", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [(r["batch"], r["row"]) for r in rows] == [(b, row) for b in ("1", "2")
                                                      for row in ("stock", "dense/off", "dense/paper")]
    assert all(r["context"] == "256" for r in rows) and rows[1]["visited_fraction"] == "1.0"
    md = out.with_suffix(".md").read_text()
    assert ["256", "2", "dense/paper"] in [r[:3] for r in markdown_rows(md)] and "sparta_timed_sdpa" in md
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["config"]["art"]["paper"]["tau"] == 1e-7 and meta["config"]["batches"] == [1, 2]
    assert meta["environment"]["torch"] == torch.__version__ and meta["environment"]["cpu"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "dense/paper" in result.output and "not checked" in result.output   # no batch >= 4


@pytest.mark.parametrize("args, hint, words", [
    (["--policies", "dense,tova"], "--policies", ["tova", "snapkv", "h2o", "quest"]),
    (["--art", "nope"], "--art", ["nope", "paper"]),
    (["--batch", "1,x"], "--batch", ["1,x"]),
    (["--contexts", "0"], "--contexts", ["16"]),
    (["--model", "no-such-model"], "--model", ["no-such-model", "smollm2-135m"]),
])
def test_cli_refuses_bad_arguments_before_loading(monkeypatch, args, hint, words):
    def boom(*a, **k):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(bd, "load", boom)
    monkeypatch.setattr("workers.data.assets.load_model", boom)
    result = CliRunner().invoke(app, ["bench", "decode", "--model", "random:llama-tiny", *args])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.replace("│", " ").split())
    assert hint in flat and all(w in flat for w in words), flat


def test_art_presets_take_overrides():
    cfg = parse_art("tuned+tau=3e-3+block_size=32+order=recency")
    assert (cfg.tau, cfg.block_size, cfg.order, cfg.patience) == (3e-3, 32, "recency", ARTConfig.preset("tuned").patience)
    assert isinstance(cfg.block_size, int)
    for bad, words in [("tuned+taux=1", "unknown ART field 'taux'"), ("tuned+tau", "not FIELD=VALUE"),
                       ("tuned+tau=fast", "not a number"), ("tuned+order=sideways", "ARTConfig.order")]:
        with pytest.raises(ValueError, match=words):
            parse_art(bad)
    labels = [label for label, _ in bd.BenchDecodeConfig(art=("tuned", "tuned+tau=1e-2")).art_configs()]
    assert labels == ["tuned", "tuned+tau=1e-2"]

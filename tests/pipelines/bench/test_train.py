"""`sparta bench train` on a tiny model: every row measured, numbers consistent, files written."""
import csv
import json

from typer.testing import CliRunner

from pipelines.bench import train as bt
from pipelines.cli import app
from tests.helpers import markdown_rows

METHODS = ("lora", "cla", "c3la", "asym")


def test_run_measures_every_row_consistently():
    cfg = bt.BenchConfig(model="random:bert-tiny", methods=METHODS, steps=2, warmup=1, batch=4, seq_len=16,
                         rank=4, device="cpu", dtype="float32")   # the byte counts below are fp32's (4 bytes)
    report = bt.run(cfg)
    by = {r.name: r for r in report.results}
    assert list(by) == [bt.FLOOR, bt.PEFT_LORA, bt.PEFT_FROZEN_A, *METHODS]
    hidden, layers = 32, 2
    assert by["lora"].trainable == by[bt.PEFT_LORA].trainable == layers * 2 * 4 * (hidden + hidden)
    assert by["cla"].trainable == by["asym"].trainable == by[bt.PEFT_FROZEN_A].trainable == layers * 2 * 4 * hidden
    assert by[bt.FLOOR].trainable == 0 and by[bt.FLOOR].overhead_ms == 0
    assert all(r.step_ms > 0 and r.peak_mib > 0 and r.saved_mib > 0 for r in report.results)
    # LoRA keeps the (tokens, hidden) input of q/v plus two (tokens, r) products per layer; cla keeps one
    # (tokens, r) gather per layer (q and v share it): exact byte counts over the floor.
    tokens = 4 * 16
    assert by["lora"].adapter_saved_mib * 2**20 == layers * tokens * (hidden + 2 * 4) * 4
    assert by["cla"].adapter_saved_mib * 2**20 == layers * tokens * 4 * 4
    assert by["cla"].adapter_saved_vs_lora < 4 / hidden
    assert by[bt.PEFT_LORA].peak_mib > by[bt.FLOOR].peak_mib
    assert report.in_width == hidden
    names = {v.target.split(":")[0] for v in bt.verdicts(report.results, cfg.rank, report.in_width)}
    assert names == {"cla", "c3la", "lora"}


def test_cli_writes_csv_markdown_and_metadata(tmp_path):
    out = tmp_path / "bench.csv"
    result = CliRunner().invoke(app, ["bench", "train", "--model", "random:bert-tiny", "--methods", "lora,cla",
                                      "--steps", "1", "--warmup", "0", "--batch", "2", "--seq-len", "8",
                                      "--rank", "2", "--no-peft", "--csv", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["name"] for r in rows] == [bt.FLOOR, "lora", "cla"]
    assert int(rows[1]["trainable"]) == 2 * 2 * 2 * 64
    assert "cla" in [r[0] for r in markdown_rows(out.with_suffix(".md").read_text())]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["config"]["methods"] == ["lora", "cla"] and meta["environment"]["device"] == "cpu"
    assert "targets" in result.output


def test_cli_rejects_unknown_methods():
    result = CliRunner().invoke(app, ["bench", "train", "--methods", "lora,dora"])
    assert result.exit_code != 0
    assert "dora" in result.output and "r_c3la" in result.output


def test_cli_rejects_unknown_models_before_building_anything():
    result = CliRunner().invoke(app, ["bench", "train", "--model", "bert-base-uncased"])
    assert result.exit_code == 2
    assert "bert-base-uncased" in result.output and "minilm-l6" in result.output

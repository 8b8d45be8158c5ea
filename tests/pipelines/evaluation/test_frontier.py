"""pipelines.evaluation.frontier on a report built here: lost and gained needles per ART setting against its
own policy's ART-off configuration, the lossless verdict (no needle lost, >= 97% identical) and the plot."""
from __future__ import annotations

from pipelines.evaluation import frontier
from pipelines.evaluation.niah import ConfigSummary, NiahConfig, NiahReport, RunConfig


def summary(label: str, skipped: float, changed: list[dict] | None, identical: float | None) -> ConfigSummary:
    return ConfigSummary(label, 0.5, {}, 10.0, skipped, 1.0, 10, None if changed is None else 1.0, 16, 32,
                         (0.3, 0.7), identical, changed or [])


def case(length: int, correct: bool) -> dict:
    return {"variant": "single", "length": length, "depth": 0.5, "sample": 0, "expected": "1", "art_off": "",
            "answer": "", "correct": correct}


def report() -> NiahReport:
    cfg = NiahConfig(model="random:llama-tiny", lengths=(4096, 8192), policies=("dense", "snapkv"),
                     art=("off", "tuned", "skip+skip_lambda=0.1"))
    configs = cfg.configs()
    changed = {"dense/tuned": [case(4096, False), case(8192, False), case(8192, True)],
               "dense/skip+skip_lambda=0.1": [], "snapkv/tuned": [case(8192, True)],
               "snapkv/skip+skip_lambda=0.1": []}
    identical = {"dense/tuned": 0.7, "dense/skip+skip_lambda=0.1": 0.96, "snapkv/tuned": 0.99,
                 "snapkv/skip+skip_lambda=0.1": 1.0}
    summaries = [summary(c.label, 0.0 if c.art == "off" else 0.1 * (i + 1),
                         None if c.art == "off" else changed[c.label], identical.get(c.label))
                 for i, c in enumerate(configs)]
    return NiahReport(cfg, configs, [], summaries, {})


def test_rows_count_lost_and_gained_per_length_and_judge_lossless():
    rows = {(r["policy"], r["art"]): r for r in frontier.frontier_rows(report())}
    assert set(rows) == {(p, a) for p in ("dense", "snapkv") for a in ("tuned", "skip+skip_lambda=0.1")}
    tuned = rows[("dense", "tuned")]
    assert (tuned["lost"], tuned["gained"], tuned["lost@4096"], tuned["lost@8192"]) == (2, 1, 1, 1)
    assert tuned["criterion"] == "stability" and rows[("dense", "skip+skip_lambda=0.1")]["criterion"] == "skip"
    assert tuned["skipped"] == 0.2 and tuned["prompts"] == 32
    # lossless: no needle lost AND >= 97% identical (a gained needle still changed the answer)
    assert [rows[k]["lossless"] for k in sorted(rows)] == [False, False, True, True]
    assert rows[("dense", "skip+skip_lambda=0.1")]["lost"] == 0   # lost none, but only 96% identical


def test_frame_and_plot(tmp_path):
    frame = frontier.frontier_frame(report())
    assert list(frame["ART"]) == ["skip+skip_lambda=0.1", "tuned", "skip+skip_lambda=0.1", "tuned"]   # most skipped first
    assert list(frame.columns[5:7]) == ["lost at 4096", "lost at 8192"]
    assert frame.iloc[1]["needles lost"] == "2" and frame.iloc[1]["lossless"] == "no"
    path = frontier.plot_frontier(report(), tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_against_walk_isolates_what_art_changed():
    """ART off is SDPA, walk our kernel: an answer walk already changed is not ART's doing."""
    from pipelines.evaluation.niah import Row

    cfg = NiahConfig(model="random:llama-tiny", lengths=(4096,), art=("off", "walk", "tuned"))
    configs = cfg.configs()
    answers = {"dense/off": ["a", "b", "c", "d"], "dense/walk": ["a", "b", "x", "d"], "dense/tuned": ["a", "y", "x", "d"]}
    right = {"dense/off": [1, 1, 1, 0], "dense/walk": [1, 1, 0, 0], "dense/tuned": [1, 0, 0, 0]}
    rows = [Row(label, "dense", label.split("/")[1], "single", 4096, 0.5, i, bool(right[label][i]), 1, 1, 4, "-",
                answers[label][i], "1", "sha") for label in answers for i in range(4)]
    changed = {"dense/walk": [case(4096, False)], "dense/tuned": [case(4096, False), case(4096, False)]}
    identical = {"dense/walk": 0.75, "dense/tuned": 0.5}
    summaries = [summary(c.label, 0.0 if c.art != "tuned" else 0.3, changed.get(c.label), identical.get(c.label))
                 for c in configs]
    rows_out = {r["art"]: r for r in frontier.frontier_rows(NiahReport(cfg, configs, rows, summaries, {}))}
    assert rows_out["tuned"]["lost"] == 2 and rows_out["tuned"]["lost_vs_walk"] == 1   # only "b" is ART's
    assert rows_out["tuned"]["identical_vs_walk"] == 0.75
    assert rows_out["walk"]["lost_vs_walk"] is None and rows_out["walk"]["lost"] == 1

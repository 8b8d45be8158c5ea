"""The Beyond-LoRA report over trials: tables of mean ± std, bound order vs measured gap, intruder curves, the
figures and the markdown, on small frames built by hand."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipelines.analysis import report

EPS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def _rows(model, dataset, method, values, column="val_accuracy", **extra):
    """One row per seed; `values[i]` goes to `column` for seed i; `extra` columns are per seed lists or
    scalars."""
    rows = []
    for seed, v in enumerate(values):
        row = {"model": model, "dataset": dataset, "method": method, "seed": seed, column: v}
        for k, x in extra.items():
            row[k] = x[seed] if isinstance(x, list) else x
        rows.append(row)
    return rows


def _rows_of(markdown: str, first: str) -> list[list[str]]:
    """The stripped cells of every markdown table row whose first cell is `first`."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("|")]
    return [r for r in rows if r[0] == first]


def _sample_std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_mean_std_table_cells_order_single_seed_and_missing():
    cla = [0.5, 0.6, 0.9]
    trials = pd.DataFrame(
        _rows("m1", "d1", "cla", cla)                          # listed before lora on purpose
        + _rows("m1", "d1", "lora", [0.8, 0.9, 1.0])
        + _rows("m1", "d1", "asym", [math.nan, math.nan, math.nan])
        + _rows("m2", "d2", "lora", [0.842])                   # one seed; cla and asym absent on m2 / d2
        + _rows("m2", "d2", "asym", [0.7, math.nan])           # the NaN seed is skipped: one value left
    )
    table = report.mean_std_table(trials, "val_accuracy")

    assert list(table.columns) == ["method", "m1 / d1", "m2 / d2"]
    assert list(table["method"]) == ["lora", "asym", "cla"]   # adapters.methods.METHODS order
    cells = table.set_index("method")
    assert _sample_std([0.8, 0.9, 1.0]) == pytest.approx(0.1)
    assert cells.loc["lora", "m1 / d1"] == "0.900 ± 0.100"
    assert _sample_std(cla) == pytest.approx(0.2082, abs=1e-4)
    assert cells.loc["cla", "m1 / d1"] == f"{sum(cla) / 3:.3f} ± {_sample_std(cla):.3f}" == "0.667 ± 0.208"
    assert cells.loc["lora", "m2 / d2"] == "0.842"
    assert cells.loc["cla", "m2 / d2"] == "-"                 # combination never ran
    assert cells.loc["asym", "m1 / d1"] == "-"                # only NaN values
    assert cells.loc["asym", "m2 / d2"] == "0.700"

    # accuracy_table and gap_table are the same table over their columns.
    assert report.accuracy_table(trials, "val_accuracy").equals(table)
    gaps = trials.rename(columns={"val_accuracy": "gap"})
    assert report.gap_table(gaps).equals(table)


def _bound_frame(bounds: dict[str, float], gap_of, model="m", dataset="d"):
    """Two seeds per method; the bound term is equal across seeds, the gap is gap_of(bound) shifted by the
    same amount on every method per seed, so the mean over seeds keeps gap_of's order."""
    rows = []
    for method, b in bounds.items():
        rows += _rows(model, dataset, method, [0.5, 0.5], gap=[gap_of(b) - 0.01, gap_of(b) + 0.03], bound_term=b)
    return pd.DataFrame(rows)


BOUNDS = {"cla": 0.4, "lora": 0.3, "paca": 0.2, "asym": 0.5, "cola": 0.1}   # not in canonical order


def test_bound_vs_gap_increasing_decreasing_and_ranks():
    up = _bound_frame(BOUNDS, lambda b: b ** 2)
    down = _bound_frame(BOUNDS, lambda b: -3 * b, model="m2", dataset="d2")
    agreements = report.bound_vs_gap(pd.concat([up, down], ignore_index=True))

    assert [(a.model, a.dataset) for a in agreements] == [("m", "d"), ("m2", "d2")]
    inc, dec = agreements
    assert inc.methods == ("lora", "cola", "asym", "paca", "cla")
    # Pearson on the ranks, so exact up to rounding (0.9999999999999999)
    assert inc.rho == pytest.approx(1.0, abs=1e-12)
    assert inc.p_value < 0.01
    assert dec.rho == pytest.approx(-1.0, abs=1e-12)

    t = inc.table
    assert list(t.columns) == ["method", "bound_term", "bound_rank", "gap_mean", "gap_rank"]
    assert list(t["method"]) == ["lora", "cola", "asym", "paca", "cla"]
    assert list(t["bound_term"]) == [0.3, 0.1, 0.5, 0.2, 0.4]
    assert list(t["bound_rank"]) == [3, 1, 5, 2, 4]
    assert list(t["gap_rank"]) == [3, 1, 5, 2, 4]
    # mean over the two seeds: b^2 - 0.01 and b^2 + 0.03 -> b^2 + 0.01
    assert list(t["gap_mean"]) == pytest.approx([0.1, 0.02, 0.26, 0.05, 0.17])
    assert list(dec.table["gap_rank"]) == [3, 5, 1, 4, 2]


def test_bound_vs_gap_ties_two_methods_and_constant_columns():
    tied = report.bound_vs_gap(_bound_frame({"lora": 0.2, "cola": 0.2, "asym": 0.7}, lambda b: b))[0]
    assert list(tied.table["bound_rank"]) == [1.5, 1.5, 3]    # average ranks, as scipy.stats.rankdata
    assert tied.rho == pytest.approx(stats.spearmanr([0.2, 0.2, 0.7], [0.2, 0.2, 0.7]).statistic)

    two = report.bound_vs_gap(_bound_frame({"lora": 0.1, "cla": 0.3}, lambda b: b))[0]
    assert two.methods == ("lora", "cla")
    assert math.isnan(two.rho) and math.isnan(two.p_value)

    flat = report.bound_vs_gap(_bound_frame({"lora": 0.1, "cola": 0.2, "cla": 0.3}, lambda b: 0.05))[0]
    assert math.isnan(flat.rho) and math.isnan(flat.p_value)

    # A method without a bound term cannot be ranked and is left out.
    frame = _bound_frame({"full": math.nan, "lora": 0.1, "cola": 0.2, "cla": 0.3}, lambda b: 0.0 if b != b else b)
    partial = report.bound_vs_gap(frame)[0]
    assert partial.methods == ("lora", "cola", "cla")
    assert partial.rho == pytest.approx(1.0, abs=1e-12)


def _intruder_frame():
    rows = []
    for seed in (0, 1):
        lora = {f"intruders_eps{e}": 10 * e + seed for e in EPS}   # seeds 0 and 1 -> mean 10 e + 0.5
        if seed == 1:
            lora["intruders_eps0.3"] = math.nan                      # one seed missing at eps 0.3
        rows.append({"model": "m", "dataset": "d", "method": "lora", "seed": seed, **lora})
        rows.append({"model": "m", "dataset": "d", "method": "full", "seed": seed,
                     **{f"intruders_eps{e}": math.nan for e in EPS}})
        rows.append({"model": "m", "dataset": "d", "method": "cla", "seed": seed,
                     **{f"intruders_eps{e}": 2.0 * seed for e in EPS}})
    return pd.DataFrame(rows)


def test_intruder_curves_parse_eps_average_seeds_and_drop_nan():
    curves = report.intruder_curves(_intruder_frame())

    assert list(curves.columns) == ["model", "dataset", "method", "eps", "intruders"]
    assert set(curves["method"]) == {"lora", "cla"}                 # full: NaN everywhere, dropped
    assert list(curves["method"]) == ["lora"] * 9 + ["cla"] * 9     # canonical order, then eps
    assert curves["eps"].dtype == np.float64
    assert list(curves["eps"]) == pytest.approx(EPS * 2)
    lora = curves[curves["method"] == "lora"].set_index("eps")["intruders"]
    for e in EPS:
        expected = 3.0 if e == 0.3 else 10 * e + 0.5                # eps 0.3: seed 0 alone (10 * 0.3 + 0)
        assert lora.loc[e] == pytest.approx(expected)
    assert list(curves[curves["method"] == "cla"]["intruders"]) == [1.0] * 9
    assert not curves["intruders"].isna().any()

    empty = report.intruder_curves(pd.DataFrame(_rows("m", "d", "lora", [0.5])))
    assert empty.empty and list(empty.columns) == list(curves.columns)


def test_plots_write_png_files(tmp_path):
    curves = report.intruder_curves(pd.concat(
        [_intruder_frame(), _intruder_frame().assign(model="m2")], ignore_index=True))
    out = report.plot_intruder_curves(curves, tmp_path / "figs" / "intruders.png")
    assert out == tmp_path / "figs" / "intruders.png"
    assert out.read_bytes()[:4] == b"\x89PNG"

    agreements = report.bound_vs_gap(pd.concat(
        [_bound_frame(BOUNDS, lambda b: b), _bound_frame({"lora": 0.1, "cla": 0.2}, lambda b: b, model="x")]))
    out = report.plot_bound_vs_gap(agreements, str(tmp_path / "bound.png"))
    assert out == tmp_path / "bound.png"
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_markdown_report_sections_rho_line_cells_and_figures():
    # gap ranks swap lora and paca (bound ranks 3 and 2): d^2 sum 2, rho = 1 - 6*2 / (5*24) = 0.9, p ~ 0.037
    gaps = {"lora": 0.2, "cola": 0.1, "asym": 0.5, "paca": 0.3, "cla": 0.4}
    frame = _bound_frame(BOUNDS, lambda b: 0.0)
    frame["gap"] = frame["method"].map(gaps)
    frame.loc[frame["method"] == "lora", "val_accuracy"] = [0.8, 0.9]
    frame["intruders_eps0.5"] = np.where(frame["method"] == "lora", [2.0, 4.0] * 5, math.nan)
    small = _bound_frame({"lora": 0.1, "cla": 0.2}, lambda b: b, model="m2", dataset="d2")
    trials = pd.concat([frame, small], ignore_index=True)
    rho, p = stats.spearmanr([0.3, 0.1, 0.5, 0.2, 0.4], [0.2, 0.1, 0.5, 0.3, 0.4])
    assert (round(rho, 2), round(p, 2)) == (0.9, 0.04)

    text = report.markdown(trials, "val_accuracy",
                           figures={"intruders": "figures/intruders.png", "bound vs gap": "figures/bound.png"})

    for heading in ("# Beyond LoRA", "## Accuracy (val_accuracy), mean ± std over seeds",
                    "## Generalization error 𝒢 = test loss - train loss", "## Bound order vs measured 𝒢",
                    "### m / d", "### m2 / d2", "## Intruder dimensions", "## Figures"):
        assert f"\n{heading}" in "\n" + text, heading
    order = [text.index(h) for h in ("## Accuracy", "## Generalization", "## Bound order", "## Intruder")]
    assert order == sorted(order)

    assert "Spearman ρ = 0.90 (p = 0.04) over 5 methods" in text
    assert "Spearman ρ = n/a over 2 methods" in text
    # accuracy: lora on m / d is 0.8, 0.9 -> 0.850 ± 0.071; the others 0.5 on both seeds
    assert f"{0.85:.3f} ± {_sample_std([0.8, 0.9]):.3f}" == "0.850 ± 0.071"
    accuracy = text[:text.index("## Generalization")]
    assert _rows_of(accuracy, "lora") == [["lora", "0.850 ± 0.071", "0.500 ± 0.000"]]
    assert _rows_of(accuracy, "paca") == [["paca", "0.500 ± 0.000", "-"]]
    # gap table: paca 0.3 on both seeds; rank table: paca bound 0.2 (rank 2), gap 0.300 (rank 3)
    gap = text[text.index("## Generalization"):text.index("## Bound order")]
    assert _rows_of(gap, "paca") == [["paca", "0.300 ± 0.000", "-"]]
    assert _rows_of(gap, "cla") == [["cla", "0.400 ± 0.000", "0.210 ± 0.028"]]   # m2: 0.19, 0.23
    ranks = text[text.index("### m / d"):text.index("### m2 / d2")]
    assert _rows_of(ranks, "method") == [["method", "bound term", "bound rank", "𝒢 mean", "𝒢 rank"]]
    assert _rows_of(ranks, "paca") == [["paca", "0.2", "2", "0.300", "3"]]
    assert _rows_of(ranks, "lora") == [["lora", "0.3", "3", "0.200", "2"]]
    # intruders at eps 0.5: lora only, 2 and 4 -> 3.000 ± 1.414
    intruders = text[text.index("## Intruder dimensions"):text.index("## Figures")]
    assert _rows_of(intruders, "lora") == [["lora", "3.000 ± 1.414"]]
    assert _rows_of(intruders, "cla") == []                            # no intruder counts measured
    assert "![intruders](figures/intruders.png)" in text
    assert "![bound vs gap](figures/bound.png)" in text

    assert "![" not in report.markdown(trials, "val_accuracy")
    unbounded = report.markdown(trials.assign(bound_term=math.nan), "val_accuracy")
    assert "No method has both a bound term and a measured 𝒢 here." in unbounded
    assert "Spearman" not in unbounded
    assert "No intruder counts" in report.markdown(trials.drop(columns=["intruders_eps0.5"]), "val_accuracy")


def test_the_learning_rates_show_when_methods_trained_at_different_ones():
    rows = (_rows("m", "d", "full", [0.9, 0.8], lr=5e-5) + _rows("m", "d", "lora", [0.9, 0.9], lr=1e-3)
            + _rows("m", "d", "lora_plus", [0.9, 0.9], lr=[1e-4, 2e-4]))
    trials = pd.DataFrame(rows).assign(gap=0.1, bound_term=1.0)
    table = report.rates_table(trials)
    assert table.to_dict("records") == [{"method": "full", "lr": "5e-05"}, {"method": "lora", "lr": "0.001"},
                                        {"method": "lora_plus", "lr": "0.0001, 0.0002"}]
    text = report.markdown(trials, "val_accuracy")
    assert text.index("## Learning rates") < text.index("## Accuracy")
    assert _rows_of(text, "lora_plus")[0] == ["lora_plus", "0.0001, 0.0002"]
    # one shared rate, or none recorded: no section
    assert report.rates_table(trials.assign(lr=1e-3)) is None
    assert "## Learning rates" not in report.markdown(trials.drop(columns=["lr"]), "val_accuracy")


def test_every_method_keeps_one_distinct_colour():
    from adapters.methods import METHODS

    colors = report.method_colors(METHODS)
    assert list(colors) == list(METHODS) and len(set(colors.values())) == len(METHODS)
    # a method's colour does not depend on which others are plotted beside it
    assert report.method_colors(["r_c3la", "lora"]) == {"lora": colors["lora"], "r_c3la": colors["r_c3la"]}
    assert set(report.method_colors(["lora", "my_method"])) == {"lora", "my_method"}

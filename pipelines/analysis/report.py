"""The report of the Beyond-LoRA analyses over a sweep's finished trials: accuracy and generalization error
(mean ± std over seeds), whether the methods' information-theoretic bound terms order them as their measured
generalization error does (Spearman), and intruder-dimension counts against eps.

Everything here is a pure function of one pandas DataFrame `trials`, one row per finished trial, with columns
model, dataset, method, seed, the metric named by the caller, gap (test loss - train loss in eval mode),
bound_term (equal across seeds of a method) and intruders_eps<eps> (NaN where not measured). Reading the trials
out of MLflow is the caller's business, so this module imports neither MLflow nor Ray.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from adapters.methods import METHODS
from pipelines import tables

_PAIR = ["model", "dataset"]
_INTRUDER_COLUMN = re.compile(r"^intruders_eps(\d+(?:\.\d+)?)$")
# The intruder count the report's short table shows (the per-eps curves are the figure).
_REPORT_EPS_COLUMN = "intruders_eps0.5"
_RANK_COLUMNS = ["method", "bound_term", "bound_rank", "gap_mean", "gap_rank"]


def _method_order(methods) -> list[str]:
    """The canonical order of adapters.methods.METHODS for the methods given; unknown names follow in the order
    they first appear (so a new method shows up rather than vanishing from a table)."""
    present = list(dict.fromkeys(methods))
    return [m for m in METHODS if m in present] + [m for m in present if m not in METHODS]


def _pairs(trials: pd.DataFrame) -> list[tuple[str, str]]:
    """(model, dataset) pairs in the order they first appear."""
    return list(dict.fromkeys(zip(trials["model"], trials["dataset"])))


def _pair_label(model: str, dataset: str) -> str:
    return f"{model} / {dataset}"


def _mean_std_cell(values: pd.Series) -> str:
    xs = pd.to_numeric(values, errors="coerce").dropna()
    if xs.empty:
        return "-"
    if len(xs) == 1:
        return f"{xs.iloc[0]:.3f}"
    return f"{xs.mean():.3f} ± {xs.std(ddof=1):.3f}"


def mean_std_table(trials: pd.DataFrame, value: str) -> pd.DataFrame:
    """Display strings of `value` per method (rows, canonical order, only methods present) and model / dataset
    pair (one column each, "model / dataset"): "0.842 ± 0.013" = mean ± sample std (ddof=1) over seeds, just
    "0.842" from one seed, "-" where the pair has no such method or only NaN values."""
    pairs = _pairs(trials)
    groups = {key: g[value] for key, g in trials.groupby(["method", *_PAIR], sort=False)}
    rows = []
    for method in _method_order(trials["method"]):
        row = {"method": method}
        for model, dataset in pairs:
            hit = groups.get((method, model, dataset))
            row[_pair_label(model, dataset)] = "-" if hit is None else _mean_std_cell(hit)
        rows.append(row)
    return pd.DataFrame(rows, columns=["method", *(_pair_label(m, d) for m, d in pairs)])


def accuracy_table(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Table-2 style: the metric, mean ± std over seeds, per method and model / dataset."""
    return mean_std_table(trials, metric)


def gap_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Table-3 style: the generalization error 𝒢 (test loss - train loss), mean ± std over seeds."""
    return mean_std_table(trials, "gap")


def rates_table(trials: pd.DataFrame) -> pd.DataFrame | None:
    """The learning rate(s) each method trained at, or None when one rate was shared (or none is known): the
    comparison is only fair when each method ran at a rate that suits it (the spec's search.by_method)."""
    if "lr" not in trials.columns or trials["lr"].dropna().nunique() < 2:
        return None
    rates = trials.groupby("method")["lr"].apply(lambda lr: ", ".join(f"{v:g}" for v in sorted(lr.dropna().unique())))
    rows = [{"method": m, "lr": rates[m]} for m in _method_order(trials["method"])]
    return pd.DataFrame(rows, columns=["method", "lr"])


@dataclass(frozen=True)
class RankAgreement:
    """How one model / dataset pair's bound terms order its methods against their measured 𝒢.

    `table` has the columns method, bound_term, bound_rank, gap_mean, gap_rank (rank 1 = smallest, ties get
    their average rank as scipy.stats.rankdata does), one row per method in `methods` (canonical order).
    `rho` and `p_value` are NaN with fewer than 3 methods or when either column is constant."""
    model: str
    dataset: str
    methods: tuple[str, ...]
    rho: float
    p_value: float
    table: pd.DataFrame


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    # Decided here rather than left to scipy, which warns and returns NaN for constant input and errors or
    # returns NaN with a warning for n < 3 depending on its version.
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def bound_vs_gap(trials: pd.DataFrame) -> list[RankAgreement]:
    """Per (model, dataset), in the order the pairs first appear: each method's bound term and mean gap over
    seeds, their ranks and Spearman's rank correlation between them. Methods with no bound term or no gap
    (NaN) are left out, since they cannot be ranked."""
    out = []
    for model, dataset in _pairs(trials):
        sub = trials[(trials["model"] == model) & (trials["dataset"] == dataset)]
        values = sub[["bound_term", "gap"]].apply(pd.to_numeric, errors="coerce")   # None -> NaN
        means = values.groupby(sub["method"], sort=False).mean()
        means = means.reindex(_method_order(means.index)).dropna()
        bound = means["bound_term"].to_numpy(dtype=float)
        gap = means["gap"].to_numpy(dtype=float)
        table = pd.DataFrame({"method": list(means.index), "bound_term": bound, "bound_rank": stats.rankdata(bound),
                              "gap_mean": gap, "gap_rank": stats.rankdata(gap)}, columns=_RANK_COLUMNS)
        rho, p = _spearman(bound, gap)
        out.append(RankAgreement(model, dataset, tuple(means.index), rho, p, table))
    return out


def _intruder_columns(trials: pd.DataFrame) -> dict[str, float]:
    """{column: eps} for the intruders_eps<eps> columns, by eps."""
    found = {c: float(m.group(1)) for c in trials.columns if (m := _INTRUDER_COLUMN.match(str(c)))}
    return dict(sorted(found.items(), key=lambda kv: kv[1]))


def intruder_curves(trials: pd.DataFrame) -> pd.DataFrame:
    """Long format, one row per model, dataset, method and eps: the mean intruder count per adapted matrix over
    seeds (NaN seeds skipped), eps parsed from the intruders_eps<eps> column names; rows without any
    measurement dropped. Ordered by pair (first appearance), canonical method, eps."""
    columns = ["model", "dataset", "method", "eps", "intruders"]
    eps_of = _intruder_columns(trials)
    if not eps_of or trials.empty:
        return pd.DataFrame(columns=columns)
    counts = trials[list(eps_of)].apply(pd.to_numeric, errors="coerce")                # None -> NaN
    means = counts.groupby([trials[c] for c in (*_PAIR, "method")], sort=False).mean().reset_index()
    long = means.melt(id_vars=[*_PAIR, "method"], var_name="column", value_name="intruders")
    long["eps"] = long["column"].map(eps_of).astype(float)
    long = long.dropna(subset=["intruders"])
    pair_rank = {p: i for i, p in enumerate(_pairs(trials))}
    method_rank = {m: i for i, m in enumerate(_method_order(trials["method"]))}
    long["_pair"] = [pair_rank[p] for p in zip(long["model"], long["dataset"])]
    long["_method"] = long["method"].map(method_rank)
    long = long.sort_values(["_pair", "_method", "eps"], kind="stable")
    return long[columns].reset_index(drop=True)


def _pyplot():
    # Agg before pyplot is first imported: the report is written on headless drivers and in tests.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def method_colors(methods) -> dict[str, tuple]:
    """A fixed colour per method (its place in adapters.methods.METHODS on matplotlib's 20-colour "tab20"), the
    same in every figure; 11 methods outrun the default 10-colour cycle, which gave two of them one colour."""
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors
    wanted = set(methods)
    order = _method_order(list(METHODS) + list(methods))
    # the dark shades (even indices) first, then the light ones: neighbours in METHODS stay far apart
    return {m: palette[(2 * i) % 20 + (2 * i) // 20] for i, m in enumerate(order) if m in wanted}


def plot_intruder_curves(curves: pd.DataFrame, path: str | Path) -> Path:
    """One PNG: a panel per (model, dataset) side by side, a line per method (mean intruders against eps)."""
    plt = _pyplot()
    path = Path(path)
    pairs = _pairs(curves) or [("", "")]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs) + 1.0, 4.0), squeeze=False,
                             layout="constrained")
    try:
        for ax, (model, dataset) in zip(axes[0], pairs):
            sub = curves[(curves["model"] == model) & (curves["dataset"] == dataset)]
            colors = method_colors(sub["method"].unique())
            for method in _method_order(sub["method"]):
                line = sub[sub["method"] == method].sort_values("eps")
                ax.plot(line["eps"], line["intruders"], marker="o", markersize=3, label=method, color=colors[method])
            ax.set_title(_pair_label(model, dataset) if model or dataset else "no intruder measurements")
            ax.set_xlabel("eps")
            ax.set_ylabel("intruders per adapted matrix")
            ax.grid(alpha=0.3)
            if not sub.empty:
                ax.legend(fontsize="small")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def _rho_text(rho: float) -> str:
    return "n/a" if math.isnan(rho) else f"{rho:.2f}"


def plot_bound_vs_gap(agreements: list[RankAgreement], path: str | Path) -> Path:
    """One PNG: a scatter panel per (model, dataset), x = bound term, y = mean 𝒢, each point labelled with its
    method, Spearman's rho in the title."""
    plt = _pyplot()
    path = Path(path)
    n = max(len(agreements), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n + 1.0, 4.0), squeeze=False, layout="constrained")
    try:
        if not agreements:
            axes[0][0].set_title("no trials")
        for ax, a in zip(axes[0], agreements):
            ax.scatter(a.table["bound_term"], a.table["gap_mean"])
            for method, x, y in zip(a.table["method"], a.table["bound_term"], a.table["gap_mean"]):
                ax.annotate(method, (x, y), textcoords="offset points", xytext=(4, 3), fontsize="small")
            ax.set_title(f"{_pair_label(a.model, a.dataset)}: Spearman ρ = {_rho_text(a.rho)}")
            ax.set_xlabel("bound term")
            # "G", not "𝒢": matplotlib's default font (DejaVu Sans) has no script G.
            ax.set_ylabel("G = test loss - train loss (mean over seeds)")
            ax.grid(alpha=0.3)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def _rho_line(a: RankAgreement) -> str:
    n = len(a.methods)
    over = f"over {n} method{'' if n == 1 else 's'}"
    if math.isnan(a.rho):
        return f"Spearman ρ = n/a {over} (needs at least 3 methods and neither column constant)"
    p = "p < 0.01" if a.p_value < 0.01 else f"p = {a.p_value:.2f}"
    return f"Spearman ρ = {a.rho:.2f} ({p}) {over}"


def _rank_display(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "method": table["method"],
        "bound term": [f"{x:.4g}" for x in table["bound_term"]],
        "bound rank": [f"{x:g}" for x in table["bound_rank"]],
        "𝒢 mean": [f"{x:.3f}" for x in table["gap_mean"]],
        "𝒢 rank": [f"{x:g}" for x in table["gap_rank"]],
    })


def markdown(trials: pd.DataFrame, metric: str, figures: dict[str, str] | None = None) -> str:
    """The whole report as markdown: accuracy and 𝒢 tables (mean ± std over seeds), the bound order against the
    measured 𝒢 per model / dataset, mean intruders at eps 0.5, and an image line per entry of `figures`
    ({name: path relative to the report})."""
    left = {"method"}
    parts = ["# Beyond LoRA: analysis report"]
    rates = rates_table(trials)
    if rates is not None:
        parts += ["## Learning rates", "The methods trained at different rates:", tables.markdown(rates, left=left)]
    parts += [
        f"## Accuracy ({metric}), mean ± std over seeds",
        tables.markdown(accuracy_table(trials, metric), left=left),
        "## Generalization error 𝒢 = test loss - train loss",
        "Mean ± std over seeds of the loss gap measured in eval mode.",
        tables.markdown(gap_table(trials), left=left),
        "## Bound order vs measured 𝒢",
        "Rank 1 = smallest; ties share their average rank.",
    ]
    for a in bound_vs_gap(trials):
        parts.append(f"### {_pair_label(a.model, a.dataset)}")
        if a.table.empty:
            parts.append("No method has both a bound term and a measured 𝒢 here.")
            continue
        parts += [_rho_line(a), tables.markdown(_rank_display(a.table), left=left)]
    parts.append("## Intruder dimensions")
    if _REPORT_EPS_COLUMN in trials.columns and trials[_REPORT_EPS_COLUMN].notna().any():
        measured = trials[trials[_REPORT_EPS_COLUMN].notna()]
        parts += ["Mean intruder count per adapted matrix at eps 0.5, mean ± std over seeds.",
                  tables.markdown(mean_std_table(measured, _REPORT_EPS_COLUMN), left=left)]
    else:
        parts.append("No intruder counts at eps 0.5 in these trials.")
    if figures:
        parts.append("## Figures")
        parts += [f"![{name}]({rel})" for name, rel in figures.items()]
    return "\n\n".join(parts) + "\n"

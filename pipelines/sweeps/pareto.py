"""The Pareto front of a sweep over several objectives (the spec's `objectives`, e.g. val_accuracy up and
peak_mem_mib down): the finished trials no other trial beats on every objective at once.

    front = pareto_table(trials, [("val_accuracy", "max"), ("peak_mem_mib", "min")])
    write_pareto(front, objectives, folder)   # pareto.csv, pareto.md, pareto.png
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.sweeps.summary import to_float

Objective = tuple[str, str]   # (metric, "max" or "min")


def pareto_mask(points: np.ndarray, modes: list[str]) -> np.ndarray:
    """(n,) bool: row i is on the front, i.e. no row j is at least as good on every objective and better
    on one. points (n, k); modes[k] "max" or "min". Equal rows are all on the front."""
    if points.ndim != 2 or points.shape[1] != len(modes):
        raise ValueError(f"points must be (n, {len(modes)}), got {points.shape}")
    bad = [m for m in modes if m not in ("max", "min")]
    if bad:
        raise ValueError(f"unknown mode {bad[0]!r}; valid: max, min")
    gain = points * np.array([1.0 if m == "max" else -1.0 for m in modes])   # higher is better everywhere
    at_least = (gain[None, :, :] >= gain[:, None, :]).all(-1)    # [i, j]: j is at least as good as i
    better = (gain[None, :, :] > gain[:, None, :]).any(-1)        # [i, j]: j beats i somewhere
    return ~(at_least & better).any(1)


def pareto_table(trials: list[dict], objectives: list[Objective]) -> pd.DataFrame:
    """One row per finished trial reporting every objective: trial_key, method, the objectives' final
    values and `pareto` (on the front), front first, then by the first objective."""
    rows = []
    for t in trials:
        final = t.get("final") or {}
        values = [final.get(metric) for metric, _ in objectives]
        if t.get("status", "FINISHED") != "FINISHED" or not all(math.isfinite(to_float(v)) for v in values):
            continue
        params = t.get("params") or {}
        rows.append({"trial_key": params.get("trial_key"), "method": params.get("method"),
                     **{metric: float(v) for (metric, _), v in zip(objectives, values)}})
    df = pd.DataFrame(rows, columns=["trial_key", "method", *(m for m, _ in objectives)])
    df["pareto"] = pareto_mask(df[[m for m, _ in objectives]].to_numpy(float), [m for _, m in objectives]) \
        if len(df) else pd.Series(dtype=bool)
    first, mode = objectives[0]
    return df.sort_values(["pareto", first], ascending=[False, mode == "min"], kind="stable").reset_index(drop=True)


def plot_pareto(df: pd.DataFrame, objectives: list[Objective], path: str | Path) -> Path:
    """The trials on the first two objectives, the front marked and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (x, x_mode), (y, y_mode) = objectives[0], objectives[1]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, group in df.groupby("method", sort=True):
        ax.scatter(group[x], group[y], label=str(method), alpha=0.75)
    front = df[df["pareto"]].sort_values(x)
    ax.plot(front[x], front[y], color="black", linewidth=1, marker="o", markerfacecolor="none", markersize=11,
            label="Pareto front")
    ax.set_xlabel(f"{x} ({'higher' if x_mode == 'max' else 'lower'} is better)")
    ax.set_ylabel(f"{y} ({'higher' if y_mode == 'max' else 'lower'} is better)")
    ax.set_title(f"{int(df['pareto'].sum())} of {len(df)} trials on the front")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_pareto(df: pd.DataFrame, objectives: list[Objective], folder: str | Path) -> dict[str, Path]:
    """pareto.csv and pareto.md (every trial, `pareto` marking the front), and pareto.png with two or more
    objectives and at least one trial."""
    folder = Path(folder)
    paths = {"csv": folder / "pareto.csv", "md": folder / "pareto.md"}
    df.to_csv(paths["csv"], index=False)
    names = ", ".join(f"{m} ({mode})" for m, mode in objectives)
    paths["md"].write_text(f"Pareto front over {names}: {int(df['pareto'].sum())} of {len(df)} trials\n\n"
                           + df.to_markdown(index=False) + "\n")
    if len(objectives) >= 2 and len(df):
        paths["png"] = plot_pareto(df, objectives, folder / "pareto.png")
    return paths

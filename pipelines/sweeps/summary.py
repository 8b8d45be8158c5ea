"""The sweep's comparison table (the paper's Table 2 shape): one row per model x dataset x method, mean
+- std over seeds, with time and memory; writers for CSV, Parquet, markdown and a PNG bar chart.

A trial is a plain dict, as the sweep driver hands it to `pipelines.sweeps.tracking.SweepTracker`:

    {"params": {"model", "dataset", "method", "seed", "lr", "rank", ..., "trial_key"},
     "final": {"metric": "accuracy", "val_accuracy", "val_loss", "test_accuracy", "wall_s",
               "samples_per_s", "peak_mem_mib", "trainable_params", ...},
     "history": [eval dicts], "status": "FINISHED" | "FAILED" | ..., "run_id": MLflow run id (optional)}
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from pipelines import tables

GROUP_KEYS = ("model", "dataset", "method")
# Hyper-parameters that tell two configurations of one method apart (the seed does not).
HPARAMS = ("lr", "rank", "alpha", "chain_segments", "lora_plus_ratio", "weight_decay")
FORMATS = ("table", "csv", "markdown")

# Metric names (or parts of them) where lower is better; everything else (accuracy, f1, ...) is higher.
_LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "error", "mse", "mae", "rmse", "wer", "cer")

COLUMNS = ["model", "dataset", "method", "metric", "n_seeds", "test_mean", "test_std", "val_mean", "val_std",
           "val_loss_mean", "wall_s_mean", "samples_per_s_mean", "peak_mem_mib_mean", "trainable_params",
           "n_failed", "n_configs"]
_FLOAT_COLUMNS = ["test_mean", "test_std", "val_mean", "val_std", "val_loss_mean", "wall_s_mean",
                  "samples_per_s_mean", "peak_mem_mib_mean"]
# The Beyond-LoRA analyses' columns (mean over seeds), present when some trial ran that analysis: column ->
# (the trial's final metric, its header in the displayed table, its format).
ANALYSIS_COLUMNS = {"gap_mean": ("gap", "gap", ".4f"),
                    "bound_term": ("analysis/bound_term", "bound", ".3g"),
                    "intruders_mean": ("analysis/intruders_eps0.5", "intruders@0.5", ".2f"),
                    "effective_rank_mean": ("analysis/effective_rank_mean", "eff. rank", ".2f"),
                    "sharpness_mean": ("analysis/landscape_merged_sharpness", "sharpness", ".3g")}


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of the main metric `metric` is better (accuracy yes, perplexity no)."""
    name = metric.lower()
    return not any(part in name for part in _LOWER_IS_BETTER)


def metric_name(trial: dict) -> str | None:
    """The trial's main metric name ("accuracy"): from its final metrics, params or last eval."""
    final, params, history = trial.get("final") or {}, trial.get("params") or {}, trial.get("history") or []
    for source in (final, params, *(reversed(history))):
        name = source.get("metric")
        if isinstance(name, str) and name:
            return name
    return None


def to_float(value) -> float:
    """`value` as a float; NaN for anything that is not a number (a missing metric, a string)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _usable(trial: dict) -> bool:
    """Finished, with a main metric whose val and test values are numbers."""
    if str(trial.get("status", "FINISHED")).upper() not in ("FINISHED", "TERMINATED"):   # MLflow's, Ray's
        return False
    name = metric_name(trial)
    final = trial.get("final") or {}
    return name is not None and not math.isnan(to_float(final.get(f"val_{name}"))) \
        and not math.isnan(to_float(final.get(f"test_{name}")))


def _config(trial: dict) -> tuple:
    params = trial.get("params") or {}
    return tuple((k, params[k]) for k in HPARAMS if k in params)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else math.nan


def _std(xs: list[float]) -> float:
    # Sample standard deviation (ddof = 1), as papers report over seeds; undefined for one seed.
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.stdev(xs) if len(xs) >= 2 else math.nan


def _seed_key(trial: dict):
    seed = (trial.get("params") or {}).get("seed")
    return (seed is None, str(type(seed)), seed if seed is not None else 0)


def _stats(trials: list[dict], metric: str) -> dict[str, Any]:
    finals = [t["final"] for t in sorted(trials, key=_seed_key)]   # fixed order: exact, repeatable sums
    test = [to_float(f.get(f"test_{metric}")) for f in finals]
    val = [to_float(f.get(f"val_{metric}")) for f in finals]
    trainable = [to_float(f.get("trainable_params")) for f in finals]
    trainable = [x for x in trainable if not math.isnan(x)]
    return {
        "n_seeds": len({(t.get("params") or {}).get("seed") for t in trials}),
        "test_mean": _mean(test), "test_std": _std(test),
        "val_mean": _mean(val), "val_std": _std(val),
        "val_loss_mean": _mean([to_float(f.get("val_loss")) for f in finals]),
        "wall_s_mean": _mean([to_float(f.get("wall_s")) for f in finals]),
        "samples_per_s_mean": _mean([to_float(f.get("samples_per_s")) for f in finals]),
        "peak_mem_mib_mean": _mean([to_float(f.get("peak_mem_mib")) for f in finals]),
        # The same for every seed of a configuration; the largest if they ever differ.
        "trainable_params": int(max(trainable)) if trainable else None,
        **{col: _mean([to_float(f.get(name)) for f in finals]) for col, (name, _, _) in ANALYSIS_COLUMNS.items()},
    }


def _better(a: tuple[float, float], b: tuple[float, float], metric: str) -> bool:
    """Is (val metric, val loss) `a` strictly better than `b`? Ties on the metric go to the lower loss."""
    sign = 1.0 if higher_is_better(metric) else -1.0
    ka = (-math.inf if math.isnan(a[0]) else sign * a[0], -math.inf if math.isnan(a[1]) else -a[1])
    kb = (-math.inf if math.isnan(b[0]) else sign * b[0], -math.inf if math.isnan(b[1]) else -b[1])
    return ka > kb


def _groups(trials: Iterable[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        params = t.get("params") or {}
        missing = [k for k in GROUP_KEYS if k not in params]
        if missing:
            raise ValueError(f"trial {params.get('trial_key', '?')!r} has no {', '.join(missing)} in its params")
        groups.setdefault(tuple(str(params[k]) for k in GROUP_KEYS), []).append(t)
    return groups


def _select_config(ok: list[dict], metric: str) -> tuple[tuple, list[dict], int]:
    """The configuration (hyper-parameters) with the best mean-over-seeds val metric, its trials, and how
    many configurations there were. Selection on val, as the paper does; test is reported, never used."""
    by_config: dict[tuple, list[dict]] = {}
    for t in ok:
        by_config.setdefault(_config(t), []).append(t)
    best_cfg, best_key = None, None
    for cfg, ts in sorted(by_config.items(), key=lambda kv: repr(kv[0])):
        s = _stats(ts, metric)
        key = (s["val_mean"], s["val_loss_mean"])
        if best_key is None or _better(key, best_key, metric):
            best_cfg, best_key = cfg, key
    return best_cfg, by_config[best_cfg], len(by_config)


def _hparam_dtype(values: list) -> str | None:
    present = [v for v in values if not _is_nan(v)]
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "Int64"
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float64"
    return None


def summary_table(trials: list[dict]) -> pd.DataFrame:
    """One row per model x dataset x method over the finished trials: seeds, mean and sample std over
    seeds of the final test and val main metric, mean val loss, train wall time, samples/s, peak memory,
    trainable parameters, failed trials, and the hyper-parameters of the row's configuration.

    Where a method ran with several configurations, the row is the one with the best mean val metric
    (ties: lower mean val loss), and `n_configs` says how many there were. Rows are sorted by model,
    dataset, then test metric from best to worst (NaN last), then method.
    """
    hparams = [k for k in HPARAMS if any(k in (t.get("params") or {}) for t in trials)]
    rows = []
    for (model, dataset, method), group in _groups(trials).items():
        ok = [t for t in group if _usable(t)]
        names = {metric_name(t) for t in group} - {None}
        metric = metric_name(ok[0]) if ok else (sorted(names)[0] if names else None)
        row: dict[str, Any] = {"model": model, "dataset": dataset, "method": method, "metric": metric}
        if ok:
            mixed = {metric_name(t) for t in ok}
            if len(mixed) > 1:
                raise ValueError(f"{model} x {dataset} x {method}: trials report different main metrics "
                                 f"({', '.join(sorted(mixed))})")
            cfg, chosen, n_configs = _select_config(ok, metric)
            row.update(_stats(chosen, metric))
            row.update(dict(cfg))
        else:
            n_configs = 0
            row.update({"n_seeds": 0, "trainable_params": None,
                        **{c: math.nan for c in _FLOAT_COLUMNS}})
        row["n_failed"] = len(group) - len(ok)
        row["n_configs"] = n_configs
        rows.append(row)
    analyses = [c for c in ANALYSIS_COLUMNS if any(not _is_nan(r.get(c)) for r in rows)]
    df = pd.DataFrame(rows, columns=COLUMNS + analyses + hparams)
    df["n_seeds"] = df["n_seeds"].astype("int64")
    df["n_failed"] = df["n_failed"].astype("int64")
    df["n_configs"] = df["n_configs"].astype("int64")
    df["trainable_params"] = df["trainable_params"].astype("Int64")
    for c in _FLOAT_COLUMNS + analyses:
        df[c] = df[c].astype("float64")
    for k in hparams:
        dtype = _hparam_dtype(list(df[k]))
        if dtype:
            df[k] = df[k].astype(dtype)
    if df.empty:
        return df
    sign = df["metric"].map(lambda m: 1.0 if m is None or higher_is_better(m) else -1.0)
    order = (-(df["test_mean"] * sign)).fillna(math.inf)
    df = df.assign(_order=order).sort_values(["model", "dataset", "_order", "method"], kind="stable")
    return df.drop(columns="_order").reset_index(drop=True)


def best_trials(trials: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (model, dataset): the single trial whose adapter represents the sweep's best result.

    The best row of `summary_table` (highest mean-over-seeds val main metric; ties: lower mean val
    loss), then, among that row's seeds, the trial with the best val metric (ties: lower val loss).
    """
    best: dict[tuple[str, str], dict] = {}
    by_pair: dict[tuple[str, str], list[tuple[dict, list[dict]]]] = {}
    for (model, dataset, method), group in _groups(trials).items():
        ok = [t for t in group if _usable(t)]
        if not ok:
            continue
        metric = metric_name(ok[0])
        _, chosen, _ = _select_config(ok, metric)
        by_pair.setdefault((model, dataset), []).append((_stats(chosen, metric) | {"metric": metric}, chosen))
    for pair, candidates in by_pair.items():
        top_stats, top_trials = None, None
        for s, ts in sorted(candidates, key=lambda c: str(c[1][0]["params"]["method"])):
            if top_stats is None or _better((s["val_mean"], s["val_loss_mean"]),
                                            (top_stats["val_mean"], top_stats["val_loss_mean"]), s["metric"]):
                top_stats, top_trials = s, ts
        metric = top_stats["metric"]
        winner = None
        for t in sorted(top_trials, key=_seed_key):
            key = (to_float(t["final"].get(f"val_{metric}")), to_float(t["final"].get("val_loss")))
            if winner is None or _better(key, winner[0], metric):
                winner = (key, t)
        best[pair] = winner[1]
    return best


def trials_table(trials: list[dict]) -> pd.DataFrame:
    """Every trial on one row: trial_key, status, run_id, its params and its final metrics ("final."
    prefix where a name is also a param)."""
    rows = []
    for t in trials:
        params, final = dict(t.get("params") or {}), dict(t.get("final") or {})
        row = {"trial_key": params.get("trial_key"), "status": str(t.get("status", "FINISHED")),
               "run_id": t.get("run_id")}
        row.update({k: v for k, v in params.items() if k != "trial_key" and not isinstance(v, (dict, list))})
        row.update({(f"final.{k}" if k in row else k): v for k, v in final.items()})
        rows.append(row)
    return pd.DataFrame(rows)


# -- rendering -------------------------------------------------------------------------------------
def _is_nan(x) -> bool:
    return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))


def _fmt(x, spec: str) -> str:
    return "-" if _is_nan(x) else format(x, spec)


def _mean_std(mean, std) -> str:
    if _is_nan(mean):
        return "-"
    return f"{mean:.4f}" if _is_nan(std) else f"{mean:.4f} ± {std:.4f}"


def _config_text(row: pd.Series, hparams: list[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in hparams if not _is_nan(row[k]))


def display_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The table as people read it: strings, mean ± std in one cell, one metric header when all rows
    share it; a config column where some method ran with several configurations, failures if any."""
    metrics = sorted({m for m in df["metric"] if isinstance(m, str)})
    one = metrics[0] if len(metrics) == 1 else None
    hparams = [k for k in HPARAMS if k in df.columns]
    out: dict[str, list[str]] = {"model": [], "dataset": [], "method": []}
    if one is None:
        out["metric"] = []
    test_h, val_h = (f"test {one}", f"val {one}") if one else ("test", "val")
    show_config = bool((df["n_configs"] > 1).any()) if len(df) else False
    show_failed = bool((df["n_failed"] > 0).any()) if len(df) else False
    analyses = {c: ANALYSIS_COLUMNS[c] for c in ANALYSIS_COLUMNS if c in df.columns}
    cols = ["seeds", test_h, val_h, "wall s", "samples/s", "peak MiB", "trainable"]
    cols += [header for _, header, _ in analyses.values()]
    cols += ["failed"] * show_failed + ["config"] * show_config
    out.update({c: [] for c in cols})
    for _, r in df.iterrows():
        out["model"].append(str(r["model"]))
        out["dataset"].append(str(r["dataset"]))
        out["method"].append(str(r["method"]))
        if one is None:
            out["metric"].append(str(r["metric"]) if isinstance(r["metric"], str) else "-")
        out["seeds"].append(str(int(r["n_seeds"])))
        out[test_h].append(_mean_std(r["test_mean"], r["test_std"]))
        out[val_h].append(_mean_std(r["val_mean"], r["val_std"]))
        out["wall s"].append(_fmt(r["wall_s_mean"], ".1f"))
        out["samples/s"].append(_fmt(r["samples_per_s_mean"], ".1f"))
        out["peak MiB"].append(_fmt(r["peak_mem_mib_mean"], ".0f"))
        out["trainable"].append(_fmt(r["trainable_params"], ","))
        for c, (_, header, spec) in analyses.items():
            out[header].append(_fmt(r[c], spec))
        if show_failed:
            out["failed"].append(str(int(r["n_failed"])))
        if show_config:
            out["config"].append(_config_text(r, hparams) if r["n_configs"] > 1 else "")
    return pd.DataFrame(out)


_LEFT = {"model", "dataset", "method", "metric", "config"}


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table of `display_frame(df)`."""
    return tables.markdown(display_frame(df), _LEFT)


def to_text(df: pd.DataFrame) -> str:
    """A fixed-width plain-text table of `display_frame(df)` for terminals and logs."""
    return tables.text(display_frame(df), _LEFT)


def render(df: pd.DataFrame, fmt: str = "table") -> str:
    """The summary as text: "table" (aligned plain text), "csv" (every column, full precision) or
    "markdown"; for `sparta sweep results EXPERIMENT --format ...`."""
    if fmt == "table":
        return to_text(df)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "markdown":
        return to_markdown(df)
    raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")


def plot_summary(df: pd.DataFrame, path: str | Path) -> Path:
    """A PNG bar chart: test main metric mean ± std over seeds, one bar per method, grouped by model x
    dataset. Drawn on a bare Agg figure (no pyplot, so no global backend is switched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    pairs = list(dict.fromkeys(zip(df["model"], df["dataset"])))
    methods = list(dict.fromkeys(df["method"]))
    n = max(len(methods), 1)
    width = 0.8 / n
    fig = Figure(figsize=(max(6.0, 1.2 + len(pairs) * (0.5 + 0.35 * n)), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for j, method in enumerate(methods):
        xs, ys, es = [], [], []
        for i, (model, dataset) in enumerate(pairs):
            hit = df[(df["model"] == model) & (df["dataset"] == dataset) & (df["method"] == method)]
            if hit.empty or _is_nan(hit["test_mean"].iloc[0]):
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(float(hit["test_mean"].iloc[0]))
            std = hit["test_std"].iloc[0]
            es.append(0.0 if _is_nan(std) else float(std))
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=method)
    metrics = sorted({m for m in df["metric"] if isinstance(m, str)})
    ax.set_xticks(range(len(pairs)), [f"{m}\n{d}" for m, d in pairs])
    ax.set_ylabel(f"test {metrics[0]}" if len(metrics) == 1 else "test main metric")
    ax.set_title("test metric, mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    if methods:
        ax.legend(fontsize="small", ncols=min(n, 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def write_summary(df: pd.DataFrame, folder: str | Path, stem: str = "summary") -> dict[str, Path]:
    """Write `stem`.csv, .parquet (pyarrow), .md and .png into `folder`; returns {format: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / f"{stem}.csv", "parquet": folder / f"{stem}.parquet",
             "markdown": folder / f"{stem}.md", "png": folder / f"{stem}.png"}
    df.to_csv(paths["csv"], index=False)
    df.to_parquet(paths["parquet"], engine="pyarrow", index=False)
    paths["markdown"].write_text(to_markdown(df) + "\n")
    plot_summary(df, paths["png"])
    return paths

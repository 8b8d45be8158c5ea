"""The Beyond-LoRA analyses of one trained adapter, run where its trial ran (a Ray worker, or `sparta analyze`):
the generalization gap, the bound terms, spectra and intruder dimensions of its updates, and loss-landscape
slices around it. Metrics come back flat under "analysis/", files (CSV + PNG) in one folder.

    metrics = analyze(adapter_dir, load_base, ("bounds", "spectrum", "intruders"), n_train=2000, out=folder)

The measures themselves are `adapters.analysis` (pure maths) and `workers.training.landscape`.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import adapters
from adapters.analysis import EPS_GRID, bound_terms, intruder_dimensions, spectrum, updates
from adapters.lowrank import read_meta
from workers.training import landscape as slices

ANALYSES = ("gap", "bounds", "spectrum", "intruders", "landscape")
PREFIX = "analysis/"
# Losses of a model on a fixed example set: "train" (a fixed slice of the training split) or "test".
Losses = Callable[[nn.Module, str], float]


def check_analyses(names) -> tuple[str, ...]:
    """The names, checked: ValueError naming the unknown ones and the valid choices."""
    names = tuple(names or ())
    bad = [n for n in names if n not in ANALYSES]
    if bad:
        raise ValueError(f"unknown analysis {', '.join(map(repr, bad))}; valid: {', '.join(ANALYSES)}")
    return names


@dataclass(frozen=True)
class AnalysisSettings:
    """intruder_k: top singular vectors of W examined. landscape_points: 1-D grid on [-1, 1] (odd, so that
    it holds the trained weights); landscape_points_2d: per axis of the 2-D grid. sigma, bits: the bound's
    sub-Gaussian parameter and weight bit width (None: the adapter's dtype)."""

    intruder_k: int = 10
    landscape_points: int = 11
    landscape_points_2d: int = 7
    sigma: float = 1.0
    bits: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.intruder_k, bool) or not isinstance(self.intruder_k, int) or self.intruder_k < 1:
            raise ValueError(f"intruder_k must be an integer >= 1, got {self.intruder_k!r}")
        for name in ("landscape_points", "landscape_points_2d"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 3 or v % 2 == 0:
                raise ValueError(f"{name} must be an odd integer >= 3 (the grid holds the trained weights at its "
                                 f"centre), got {v!r}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma!r}")
        if self.bits is not None and (isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits < 1):
            raise ValueError(f"bits must be an integer >= 1 or None (the adapter's dtype), got {self.bits!r}")

    @classmethod
    def from_dict(cls, values: dict | None) -> AnalysisSettings:
        """From a plain mapping (a trial's config); ValueError naming an unknown key and the valid ones."""
        values = dict(values or {})
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in values if k not in valid]
        if unknown:
            raise ValueError(f"unknown analysis setting {unknown[0]!r}; valid: {', '.join(valid)}")
        return cls(**values)


def analyze(adapter_dir: str | Path, load_base: Callable[[], nn.Module], analyses, *, n_train: int,
            out: str | Path, losses: Losses | None = None,
            settings: AnalysisSettings = AnalysisSettings()) -> dict[str, float]:
    """Run `analyses` (of ANALYSES) on the sparta adapter at `adapter_dir`. load_base: a fresh, unmodified
    copy of its base model (the adapter is loaded onto it; at most one copy is made). n_train: the training
    examples (the bound's |N|). losses: the model's loss on a fixed set, needed by "gap" and "landscape".
    Writes CSV and PNG files into `out`; returns the metrics."""
    analyses = check_analyses(analyses)
    if losses is None and {"gap", "landscape"} & set(analyses):
        raise ValueError("the gap and landscape analyses need `losses` (a model's loss on a fixed example set)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = adapters.AdapterConfig.from_dict(read_meta(adapter_dir)["config"])
    base = load_base()
    moved = updates(base, adapter_dir) if {"spectrum", "intruders", "landscape"} & set(analyses) else {}
    handle = adapters.load(base, adapter_dir)   # the trained model: base + adapter (+ its head)
    model = handle.model.eval()
    metrics: dict[str, float] = {}
    if "gap" in analyses:
        train, test = losses(model, "train"), losses(model, "test")
        metrics.update({"train_eval_loss": train, "test_loss": test, "gap": test - train})
    if "bounds" in analyses:
        metrics.update(_bounds(handle, config, n_train, settings))
    if "spectrum" in analyses:
        metrics.update(_spectra(moved, out))
    if "intruders" in analyses:
        metrics.update(_intruders(moved, out, settings.intruder_k))
    if "landscape" in analyses:
        metrics.update(_landscapes(handle, list(moved), losses, out, settings))
    return {PREFIX + k: float(v) for k, v in metrics.items()}


def adapted_shapes(handle) -> list[tuple[int, int]]:
    """(n rows out, m columns in) of each trained matrix: the adapted layers' weights, or for full fine-tuning
    every trained tensor but the head's (a vector of n counts as (n, 1))."""
    if handle.config.spec.layer != "full":
        return [tuple(layer.base_layer.weight.shape) for layer in handle.layers.values()]
    head = {id(p) for p in handle.head_parameters()}
    return [(p.shape[0], p[0].numel() if p.dim() > 1 else 1) for p in handle.adapter_parameters() if id(p) not in head]


def _bounds(handle, config, n_train: int, settings: AnalysisSettings) -> dict[str, float]:
    dtype = next(handle.model.parameters()).dtype
    bits = settings.bits or torch.finfo(dtype).bits
    terms = bound_terms(config.method, adapted_shapes(handle), config.rank, config.chain_segments, n_train,
                        bits=bits, sigma=settings.sigma)
    return {"bound_term": terms.term, "bound_S": terms.S, "bound_trained_bits": terms.trained_bits}


def _spectra(moved: dict, out: Path) -> dict[str, float]:
    rows, values = [], {}
    for name, (w0, dw) in moved.items():
        s = spectrum(w0, w0 + dw)
        values[name] = s.singular_values
        rows.append({"module": name, "rows": w0.shape[0], "columns": w0.shape[1], "k": s.k,
                     "spectral_norm": s.spectral_norm, "frobenius_norm": s.frobenius_norm,
                     "effective_rank": s.effective_rank, "stable_rank": s.stable_rank, "alignment": s.alignment})
    _write_csv(out / "spectrum.csv", rows)
    _plot_spectra(values, out / "spectrum.png")
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {f"{key}_mean": mean(key) for key in ("effective_rank", "stable_rank", "alignment", "spectral_norm",
                                                 "frobenius_norm")}


def _intruders(moved: dict, out: Path, k: int) -> dict[str, float]:
    rows = []
    for name, (w0, dw) in moved.items():
        found = intruder_dimensions(w0, w0 + dw, k)
        rows += [{"module": name, "eps": eps, "intruders": count} for eps, count in found.curve(EPS_GRID)]
    _write_csv(out / "intruders.csv", rows)
    per_eps = {eps: [r["intruders"] for r in rows if r["eps"] == eps] for eps in EPS_GRID}
    mean = {eps: sum(c) / len(c) for eps, c in per_eps.items()}
    _plot_curve(mean, out / "intruders.png", k)
    return {f"intruders_eps{eps:g}": m for eps, m in mean.items()}


def _landscapes(handle, merged_names: list[str], losses: Losses, out: Path,
                settings: AnalysisSettings) -> dict[str, float]:
    """1-D and 2-D slices of the training loss along filter-normalised directions: over the adapter's trained
    parameters, then over the merged weights of the adapted matrices."""
    line = slices.symmetric_grid(settings.landscape_points)
    grid = slices.symmetric_grid(settings.landscape_points_2d)
    head = {id(p) for p in handle.head_parameters()}
    named = {n: p for n, p in handle.model.named_parameters() if p.requires_grad and id(p) not in head}
    metrics = {}
    for variant in ("adapter", "merged"):
        if variant == "merged":
            model = handle.merge()
            named = {name: model.get_submodule(name).weight for name in merged_names}
        model = handle.model
        loss = lambda: losses(model, "train")  # noqa: E731
        one = slices.loss_slice(loss, named, line, seed=settings.seed)
        two = slices.loss_slice(loss, named, grid, grid, seed=settings.seed)
        for dims, surface in (("1d", one), ("2d", two)):
            stem = out / f"landscape-{variant}-{dims}"
            slices.write_csv(surface, stem.with_suffix(".csv"))
            slices.plot(surface, stem.with_suffix(".png"), f"training loss around the {variant} weights ({dims})")
        metrics[f"landscape_{variant}_sharpness"] = one.sharpness()
        metrics[f"landscape_{variant}_2d_sharpness"] = two.sharpness()
        if one.curvature() is not None:
            metrics[f"landscape_{variant}_curvature"] = one.curvature()
    return metrics


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _figure(size: tuple[float, float]):
    """A bare Figure on the Agg canvas (no pyplot state, nothing to close: safe on headless Ray workers)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _plot_spectra(values: dict[str, torch.Tensor], path: Path, top: int = 64) -> None:
    fig, ax = _figure((6, 4))
    for s in values.values():
        s = s[:top]
        ax.semilogy(range(1, len(s) + 1), (s / s[0].clamp_min(1e-30)).clamp_min(1e-8).tolist(), alpha=0.4, lw=1)
    ax.set(xlabel="singular value index", ylabel="sigma_i / sigma_1 of the update", title="spectra of the updates")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_curve(mean: dict[float, float], path: Path, k: int) -> None:
    fig, ax = _figure((5, 3.5))
    ax.plot(list(mean), list(mean.values()), marker="o")
    ax.set(xlabel="eps", ylabel=f"intruders per matrix (top {k})", title="intruder dimensions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)

"""Loss landscapes (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"): 1-D and 2-D slices of a
loss around trained weights theta, along random directions normalised filter by filter so that slices of
differently scaled networks (or adapters) can be compared.

    surface = loss_slice(lambda: eval_loss(model), dict(model.named_parameters()), alphas, betas)
    surface.sharpness()

Plain PyTorch and matplotlib: the caller supplies the loss (a model on its data) and the parameters to move.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch


def filter_normalized_direction(params: Mapping[str, torch.Tensor], generator: torch.Generator
                                ) -> dict[str, torch.Tensor]:
    """A Gaussian direction per tensor with each filter (a slice along dim 0: a row of a matrix, an output
    channel) rescaled to the norm of the same filter of the parameter; tensors of dim <= 1 (biases, norms)
    get zero, as in Li et al."""
    out = {}
    for name, p in params.items():
        p = p.detach()
        if p.dim() <= 1:
            out[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        rows_d = d.reshape(d.shape[0], -1)
        rows_p = p.float().cpu().reshape(p.shape[0], -1)
        scale = rows_p.norm(dim=1, keepdim=True) / rows_d.norm(dim=1, keepdim=True).clamp_min(1e-30)
        out[name] = (rows_d * scale).reshape(p.shape).to(device=p.device, dtype=p.dtype)
    return out


def symmetric_grid(points: int, radius: float = 1.0) -> tuple[float, ...]:
    """`points` evenly spaced values on [-radius, radius], exactly 0 in the middle when `points` is odd."""
    if points < 2:
        raise ValueError(f"a grid needs at least 2 points, got {points}")
    return tuple(0.0 if 2 * i == points - 1 else radius * (2 * i / (points - 1) - 1) for i in range(points))


@dataclass(frozen=True)
class Landscape:
    """A slice of the loss: losses[j][i] at theta + alphas[i] d1 (+ betas[j] d2)."""

    alphas: tuple[float, ...]
    betas: tuple[float, ...] | None        # None for a 1-D slice
    losses: tuple[tuple[float, ...], ...]  # [len(betas) or 1][len(alphas)]
    center_loss: float                     # at theta itself

    @property
    def dims(self) -> int:
        return 1 if self.betas is None else 2

    def sharpness(self) -> float:
        """The highest loss on the slice minus the loss at theta: how much the loss rises within the slice's
        radius (a Keskar et al. style sharpness)."""
        return max(max(row) for row in self.losses) - self.center_loss

    def curvature(self) -> float | None:
        """(L(h) - 2 L(0) + L(-h)) / h^2 at the centre of a 1-D slice on a uniform grid symmetric about 0 (None
        for other slices): the second derivative along d1, d1^T H d1 for a quadratic."""
        a = self.alphas
        c = len(a) // 2
        if self.dims != 1 or len(a) < 3 or len(a) % 2 == 0:
            return None
        h = (a[c + 1] - a[c - 1]) / 2   # both neighbours: linspace's rounding leaves steps unequal in the last bit
        steps = [a[i + 1] - a[i] for i in range(len(a) - 1)]
        tol = 1e-9 * abs(h)
        if h <= 0 or abs(a[c]) > tol or max(steps) - min(steps) > tol:
            return None
        # L(0) is center_loss, evaluated at theta itself (a float32 linspace's centre is only ~1e-8 from 0).
        row = self.losses[0]
        return (row[c + 1] - 2 * self.center_loss + row[c - 1]) / h ** 2

    def rows(self) -> list[dict]:
        """One dict per grid point: alpha, beta (2-D only), loss."""
        if self.betas is None:
            return [{"alpha": a, "loss": loss} for a, loss in zip(self.alphas, self.losses[0])]
        return [{"alpha": a, "beta": b, "loss": loss} for b, row in zip(self.betas, self.losses)
                for a, loss in zip(self.alphas, row)]


@torch.no_grad()
def loss_slice(loss_fn: Callable[[], float], params: Mapping[str, torch.Tensor], alphas, betas=None,
               seed: int = 0) -> Landscape:
    """The loss at theta + a d1 (+ b d2) for a in `alphas` (and b in `betas`): d1, d2 filter-normalised
    directions from seeds `seed` and `seed + 1`. The parameters are moved in place and always put back
    bit-exactly, also when `loss_fn` raises."""
    if not params:
        raise ValueError("loss_slice: params is empty: give the parameters to move")
    alphas = tuple(float(a) for a in alphas)
    if not alphas:
        raise ValueError("loss_slice: alphas is empty: give the grid's points")
    betas = None if betas is None else tuple(float(b) for b in betas)
    if betas is not None and not betas:
        raise ValueError("loss_slice: betas is empty: give the grid's points, or None for a 1-D slice")
    d1 = filter_normalized_direction(params, torch.Generator().manual_seed(seed))
    d2 = filter_normalized_direction(params, torch.Generator().manual_seed(seed + 1)) if betas else None
    theta = {name: p.detach().clone() for name, p in params.items()}
    try:
        center = float(loss_fn())
        losses = []
        for b in betas or (0.0,):
            row = []
            for a in alphas:
                for name, p in params.items():   # set, not add: no drift from repeated in-place updates
                    moved = theta[name] + a * d1[name]
                    p.copy_(moved + b * d2[name] if d2 is not None else moved)
                row.append(float(loss_fn()))
            losses.append(tuple(row))
    finally:
        for name, p in params.items():
            p.copy_(theta[name])
    return Landscape(alphas, betas, tuple(losses), center)


def write_csv(landscape: Landscape, path: str | Path) -> Path:
    """The slice as CSV: a row per grid point, columns alpha, (beta,) loss."""
    path = Path(path)
    rows = landscape.rows()
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot(landscape: Landscape, path: str | Path, title: str) -> Path:
    """A line (1-D, the trained weights marked) or a filled contour (2-D) of the slice, as a PNG. A bare Figure
    on the Agg canvas: no pyplot state, nothing to close, safe on headless Ray workers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if landscape.dims == 1:
        ax.plot(landscape.alphas, landscape.losses[0], marker="o", ms=3)
        ax.scatter([0.0], [landscape.center_loss], color="red", zorder=3, label="trained weights")
        ax.set(xlabel="alpha", ylabel="loss")
        ax.legend(fontsize=8)
    else:
        filled = ax.contourf(landscape.alphas, landscape.betas, landscape.losses, levels=20)
        fig.colorbar(filled, ax=ax, label="loss")
        ax.plot([0.0], [0.0], "r+", ms=10, label="trained weights")
        ax.set(xlabel="alpha", ylabel="beta")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path

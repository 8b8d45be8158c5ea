"""workers.training.landscape with known answers: filter normalisation, and slices of a quadratic loss at its
minimum, where the 1-D slice is 0.5 a^2 d^T H d exactly and the central second difference is d^T H d."""
import csv

import numpy as np
import pytest
import torch

from workers.training.landscape import filter_normalized_direction, loss_slice, plot, symmetric_grid, write_csv


def test_each_filter_of_the_direction_has_the_norm_of_the_weights_filter():
    g = torch.Generator().manual_seed(11)
    w = torch.randn(5, 7, generator=g)
    w[2] = 0.0
    conv = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)   # filters = output channels
    params = {"w": w, "b": torch.randn(5, generator=g), "conv": conv}
    d = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    torch.testing.assert_close(d["w"].norm(dim=1), w.norm(dim=1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d["conv"].flatten(1).norm(dim=1), conv.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
    assert d["conv"].dtype == torch.float64 and d["conv"].shape == conv.shape
    assert torch.equal(d["w"][2], torch.zeros(7))            # a zero filter stays zero
    assert torch.equal(d["b"], torch.zeros(5))               # 1-D tensors do not move
    assert not torch.allclose(d["w"][0], w[0])               # random, not theta's own filter
    again = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    other = filter_normalized_direction(params, torch.Generator().manual_seed(1))
    assert torch.equal(again["w"], d["w"]) and not torch.equal(other["w"], d["w"])


def test_symmetric_grid_has_an_exact_zero_in_the_middle():
    grid = symmetric_grid(11, radius=2.0)
    assert len(grid) == 11 and grid[0] == -2.0 and grid[5] == 0.0 and grid[-1] == 2.0
    assert grid == pytest.approx(np.linspace(-2, 2, 11).tolist(), abs=1e-15)
    with pytest.raises(ValueError, match="at least 2 points"):
        symmetric_grid(1)


class Quadratic:
    """loss(theta) = 0.5 vec(theta - theta*)^T H vec(theta - theta*), evaluated at theta = params["w"], plus
    |b - 1| for a bias that must not move (a moved bias would break every expected value below)."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.star = torch.randn(4, 3, generator=g, dtype=torch.float64)
        m = torch.randn(12, 12, generator=g, dtype=torch.float64)
        self.h = m @ m.T + torch.eye(12, dtype=torch.float64)   # SPD
        self.params = {"w": self.star.clone(), "b": torch.ones(4, dtype=torch.float64)}

    def __call__(self) -> float:
        x = (self.params["w"] - self.star).reshape(-1)
        return float(0.5 * x @ self.h @ x + (self.params["b"] - 1).abs().sum())

    def form(self, v: torch.Tensor) -> float:
        return float(v.reshape(-1) @ self.h @ v.reshape(-1))


def test_a_1d_slice_of_a_quadratic_at_its_minimum():
    q = Quadratic()
    before = {k: v.clone() for k, v in q.params.items()}
    alphas = np.linspace(-1, 1, 11)
    surface = loss_slice(q, q.params, alphas, seed=3)
    d = filter_normalized_direction(q.params, torch.Generator().manual_seed(3))["w"]
    dhd = q.form(d)
    assert dhd > 0
    assert surface.dims == 1 and surface.betas is None and surface.center_loss == 0.0
    assert surface.alphas == tuple(alphas.tolist()) and len(surface.losses) == 1
    for a, loss in zip(surface.alphas, surface.losses[0]):
        assert loss == pytest.approx(0.5 * a * a * dhd, rel=1e-9, abs=1e-12)
    assert surface.alphas[surface.losses[0].index(min(surface.losses[0]))] == 0.0
    assert surface.sharpness() == pytest.approx(0.5 * dhd, rel=1e-9)
    assert surface.curvature() == pytest.approx(dhd, rel=1e-9)
    assert all(torch.equal(q.params[k], before[k]) for k in before)   # put back bit-exactly
    assert surface.rows()[0] == {"alpha": -1.0, "loss": surface.losses[0][0]}


def test_curvature_only_for_a_symmetric_uniform_1d_grid():
    q = Quadratic(4)
    assert loss_slice(q, q.params, [-1.0, 0.0, 0.5, 1.0]).curvature() is None      # even count, no centre
    assert loss_slice(q, q.params, [-1.0, -0.2, 0.0, 0.2, 1.0]).curvature() is None  # not uniform
    assert loss_slice(q, q.params, [0.0, 1.0, 2.0]).curvature() is None             # 0 not in the middle
    # A float32 linspace (centre ~1e-8 off 0) still counts; the value is d^T H d up to that offset.
    d = filter_normalized_direction(q.params, torch.Generator().manual_seed(0))["w"]
    alphas = torch.linspace(-1, 1, 5).tolist()
    assert loss_slice(q, q.params, alphas).curvature() == pytest.approx(q.form(d), rel=1e-6)


def test_a_2d_slice_of_a_quadratic():
    q = Quadratic(1)
    before = {k: v.clone() for k, v in q.params.items()}
    alphas, betas = [-1.0, 0.0, 0.5, 1.0], [-0.5, 0.0, 0.5]
    surface = loss_slice(q, q.params, alphas, betas, seed=5)
    d1 = filter_normalized_direction(q.params, torch.Generator().manual_seed(5))["w"]
    d2 = filter_normalized_direction(q.params, torch.Generator().manual_seed(6))["w"]
    assert surface.dims == 2 and len(surface.losses) == 3 and all(len(r) == 4 for r in surface.losses)
    for j, b in enumerate(betas):
        for i, a in enumerate(alphas):
            assert surface.losses[j][i] == pytest.approx(0.5 * q.form(a * d1 + b * d2), rel=1e-9, abs=1e-12)
    assert surface.losses[0][0] != pytest.approx(0.5 * q.form(-1.0 * d1 - 0.5 * d1), rel=1e-6)   # d2 is not d1
    assert surface.sharpness() == pytest.approx(max(max(r) for r in surface.losses), rel=1e-12)
    rows = surface.rows()
    assert len(rows) == 12 and rows[1] == {"alpha": 0.0, "beta": -0.5, "loss": surface.losses[0][1]}
    assert rows[-1] == {"alpha": 1.0, "beta": 0.5, "loss": surface.losses[2][3]}
    assert surface.curvature() is None
    assert all(torch.equal(q.params[k], before[k]) for k in before)


def test_the_weights_come_back_when_the_loss_raises():
    q = Quadratic(2)
    before = {k: v.clone() for k, v in q.params.items()}
    calls = []

    def failing():
        calls.append(q())
        if len(calls) == 3:   # the centre, one grid point, then the failure while the weights are moved
            raise RuntimeError("out of memory")
        return calls[-1]

    with pytest.raises(RuntimeError, match="out of memory"):
        loss_slice(failing, q.params, [-1.0, 0.0, 1.0])
    assert len(calls) == 3 and calls[1] > 0        # the weights really had moved before the failure
    assert all(torch.equal(q.params[k], before[k]) for k in before)


def test_csv_and_png_files(tmp_path):
    q = Quadratic(3)
    one = loss_slice(q, q.params, [-1.0, 0.0, 1.0])
    two = loss_slice(q, q.params, [-1.0, 0.0, 1.0], [-1.0, 1.0])
    with write_csv(two, tmp_path / "two.csv").open() as f:
        got = list(csv.DictReader(f))
    grid = [(a, b) for b in (-1.0, 1.0) for a in (-1.0, 0.0, 1.0)]
    assert [(float(r["alpha"]), float(r["beta"])) for r in got] == grid
    assert [float(r["loss"]) for r in got] == [loss for row in two.losses for loss in row]
    with write_csv(one, tmp_path / "one.csv").open() as f:
        reader = csv.DictReader(f)
        got = list(reader)
    assert reader.fieldnames == ["alpha", "loss"] and [float(r["loss"]) for r in got] == list(one.losses[0])
    for surface, name in ((one, "one.png"), (two, "two.png")):
        png = plot(surface, tmp_path / name, "t")
        assert png == tmp_path / name and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_arguments_are_named():
    q = Quadratic()
    with pytest.raises(ValueError, match="params is empty"):
        loss_slice(q, {}, [0.0])
    with pytest.raises(ValueError, match="alphas is empty"):
        loss_slice(q, q.params, [])
    with pytest.raises(ValueError, match="betas is empty"):
        loss_slice(q, q.params, [0.0], [])

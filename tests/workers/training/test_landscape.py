"""workers.training.landscape with known answers: filter normalisation, and slices of a quadratic loss at its
minimum, where the 1-D slice is 0.5 a^2 d^T H d exactly."""
import csv

import pytest
import torch

from workers.training.landscape import filter_normalized_direction, loss_slice, plot, symmetric_grid, write_csv


def test_each_filter_of_the_direction_has_the_norm_of_the_weights_filter():
    w = torch.randn(5, 7)
    w[2] = 0.0
    params = {"w": w, "b": torch.randn(5)}
    d = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    torch.testing.assert_close(d["w"].norm(dim=1), w.norm(dim=1), rtol=1e-5, atol=1e-7)
    assert torch.equal(d["w"][2], torch.zeros(7))            # a zero filter stays zero
    assert torch.equal(d["b"], torch.zeros(5))               # 1-D tensors do not move
    again = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    other = filter_normalized_direction(params, torch.Generator().manual_seed(1))
    assert torch.equal(again["w"], d["w"]) and not torch.equal(other["w"], d["w"])


class Quadratic:
    """loss(theta) = 0.5 vec(theta - theta*)^T H vec(theta - theta*), evaluated at theta = params["w"], with
    a bias that the loss also reads (it must not move)."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.star = torch.randn(4, 3, generator=g, dtype=torch.float64)
        m = torch.randn(12, 12, generator=g, dtype=torch.float64)
        self.h = m @ m.T + torch.eye(12, dtype=torch.float64)
        self.params = {"w": self.star.clone(), "b": torch.ones(4, dtype=torch.float64)}

    def __call__(self) -> float:
        x = (self.params["w"] - self.star).reshape(-1)
        return float(0.5 * x @ self.h @ x + (self.params["b"] - 1).abs().sum())

    def form(self, v: torch.Tensor) -> float:
        return float(v.reshape(-1) @ self.h @ v.reshape(-1))


def test_a_1d_slice_of_a_quadratic_at_its_minimum():
    q = Quadratic()
    before = {k: v.clone() for k, v in q.params.items()}
    alphas = symmetric_grid(11)
    assert alphas[5] == 0.0 and alphas[0] == -1.0 and alphas[-1] == 1.0
    surface = loss_slice(q, q.params, alphas, seed=3)
    d = filter_normalized_direction(q.params, torch.Generator().manual_seed(3))["w"]
    dhd = q.form(d)
    assert surface.dims == 1 and surface.center_loss == 0.0
    for a, loss in zip(surface.alphas, surface.losses[0]):
        assert loss == pytest.approx(0.5 * a * a * dhd, rel=1e-9, abs=1e-12)
    assert surface.alphas[surface.losses[0].index(min(surface.losses[0]))] == 0.0
    assert surface.sharpness() == pytest.approx(0.5 * dhd, rel=1e-9)
    assert surface.curvature() == pytest.approx(dhd, rel=1e-6)
    assert all(torch.equal(q.params[k], before[k]) for k in before)   # put back bit-exactly


def test_a_2d_slice_of_a_quadratic():
    q = Quadratic(1)
    alphas, betas = [-1.0, 0.0, 0.5, 1.0], [-0.5, 0.0, 0.5]
    surface = loss_slice(q, q.params, alphas, betas, seed=0)
    d1 = filter_normalized_direction(q.params, torch.Generator().manual_seed(0))["w"]
    d2 = filter_normalized_direction(q.params, torch.Generator().manual_seed(1))["w"]
    assert surface.dims == 2 and len(surface.losses) == 3 and all(len(r) == 4 for r in surface.losses)
    for j, b in enumerate(betas):
        for i, a in enumerate(alphas):
            assert surface.losses[j][i] == pytest.approx(0.5 * q.form(a * d1 + b * d2), rel=1e-9, abs=1e-12)
    rows = surface.rows()
    assert len(rows) == 12 and rows[1] == {"alpha": 0.0, "beta": -0.5, "loss": surface.losses[0][1]}
    assert surface.curvature() is None


def test_the_weights_come_back_when_the_loss_raises():
    q = Quadratic(2)
    before = q.params["w"].clone()
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return q()

    with pytest.raises(RuntimeError, match="out of memory"):
        loss_slice(failing, q.params, [-1.0, 0.0, 1.0])
    assert torch.equal(q.params["w"], before)


def test_files_and_errors(tmp_path):
    q = Quadratic(3)
    one = loss_slice(q, q.params, [-1.0, 0.0, 1.0])
    two = loss_slice(q, q.params, [-1.0, 0.0, 1.0], [-1.0, 1.0])
    with write_csv(two, tmp_path / "two.csv").open() as f:
        got = list(csv.DictReader(f))
    assert [(float(r["alpha"]), float(r["beta"])) for r in got] == [(a, b) for b in (-1.0, 1.0) for a in (-1.0, 0.0, 1.0)]
    for surface, name in ((one, "one.png"), (two, "two.png")):
        assert plot(surface, tmp_path / name, "t").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="params is empty"):
        loss_slice(q, {}, [0.0])
    with pytest.raises(ValueError, match="alphas is empty"):
        loss_slice(q, q.params, [])

"""PaCA trains W's selected columns directly; under Adam, paca at lr s * eta takes the same column
steps as cla at lr eta (Adam's step is invariant to the gradient's scale s, up to eps)."""
import torch

from adapters import AdapterConfig, apply

from .conftest import batch, tiny_model


def train(method, lr, idx_from=None, steps=5):
    model = tiny_model("bert").double()   # float64: rounding noise stays far below Adam's eps
    ids, labels = batch(model)
    h = apply(model, AdapterConfig(method=method, rank=4, alpha=12))   # s = 3
    if idx_from is not None:
        for name, layer in h.layers.items():
            layer.set_selector(idx_from[name])
    groups = h.param_groups(1e-2)
    for g in groups:
        if g["name"].startswith("adapter"):
            g["lr"] = lr
    opt = torch.optim.Adam(groups, eps=1e-30)  # the identity is exact as eps -> 0; q grads here reach 1e-12
    for _ in range(steps):
        model(ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return h


def test_paca_at_s_eta_equals_cla_at_eta():
    eta, s = 1e-3, 3.0
    cla = train("cla", eta)
    paca = train("paca", s * eta, idx_from={n: layer.idx for n, layer in cla.layers.items()})
    for name, layer in cla.layers.items():
        w_cla = layer.effective_weight().detach()
        w_paca = paca.layers[name].effective_weight().detach()
        moved = (w_cla - layer.base_layer.weight).abs().max()
        assert moved > 1e-4
        torch.testing.assert_close(w_paca, w_cla, rtol=1e-6, atol=1e-9)

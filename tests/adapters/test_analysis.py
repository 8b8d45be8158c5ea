"""adapters.analysis with known answers: intruder counts on constructed matrices, the spectrum of a known
low-rank update, the bound terms against their formula (and the spec's parameter counts), the gap in eval
mode, and a saved adapter's updates against the live adapter's."""
import copy
import math

import pytest
import torch
import transformers as tf
from torch import nn

from adapters import METHODS, AdapterConfig
from adapters.analysis import (EPS_GRID, bound_terms, generalization_gap, intruder_dimensions, mean_loss,
                               spectrum, updates)
from adapters.lowrank import factors
from tests.helpers import trained_adapter
from workers.data.assets import tiny_config


def orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


def unit(n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, generator=g, dtype=torch.float64)
    return x / x.norm()


# ---- intruder dimensions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_large_random_rank_one_update_is_exactly_one_intruder(seed):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(256, 256, generator=g, dtype=torch.float64) / 16
    s = 2.0 * float(torch.linalg.matrix_norm(w0, 2))        # above w0's top singular value
    w = w0 + s * torch.outer(unit(256, g), unit(256, g))
    found = intruder_dimensions(w0, w, k=10)
    assert found.count(0.5) == 1
    assert found.max_cosine[0] < 0.5 and (found.max_cosine[1:] >= 0.5).all()   # it is the new top direction


def test_a_rescaled_matrix_has_no_intruders():
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(256, 256, generator=g, dtype=torch.float64) / 16
    found = intruder_dimensions(w0, 3.0 * w0, k=10)
    assert found.count(0.5) == 0 and found.count(0.9) == 0
    torch.testing.assert_close(found.max_cosine, torch.ones(10), atol=1e-5, rtol=0)


def test_the_curve_counts_more_intruders_as_eps_grows():
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(128, 96, generator=g, dtype=torch.float64) / 12
    w = w0 + 0.3 * torch.randn(128, 96, generator=g, dtype=torch.float64) / 12
    curve = intruder_dimensions(w0, w, k=16).curve()
    assert [e for e, _ in curve] == list(EPS_GRID)
    counts = [c for _, c in curve]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    assert counts[-1] <= 16


# ---- spectrum ---------------------------------------------------------------------------------------------

def test_spectrum_of_a_known_low_rank_update():
    g = torch.Generator().manual_seed(5)
    u0, v0 = orthonormal(64, 64, g), orthonormal(48, 48, g)
    sigma0 = torch.linspace(10, 1, 48, dtype=torch.float64)
    w0 = u0[:, :48] @ torch.diag(sigma0) @ v0.T
    s = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    along = u0[:, :4] @ torch.diag(s) @ v0[:, :4].T         # dW inside W0's top-4 singular subspaces
    got = spectrum(w0, w0 + along)
    torch.testing.assert_close(got.singular_values[:4], s.float(), atol=1e-5, rtol=0)
    assert got.singular_values[4:].abs().max() < 1e-5
    p = s / s.sum()
    assert got.effective_rank == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)
    assert got.stable_rank == pytest.approx(30 / 16, rel=1e-6)
    assert got.spectral_norm == pytest.approx(4.0, rel=1e-6)
    assert got.frobenius_norm == pytest.approx(math.sqrt(30), rel=1e-6)
    assert got.k == 4 and got.alignment == pytest.approx(1.0, abs=1e-9)
    # the same singular values in W0's bottom directions: no alignment with its top-4
    away = u0[:, 44:48] @ torch.diag(s) @ v0[:, 44:48].T
    assert spectrum(w0, w0 + away).alignment == pytest.approx(0.0, abs=1e-9)


def test_spectrum_of_no_update_is_zero():
    w0 = torch.randn(8, 6)
    got = spectrum(w0, w0.clone())
    assert got.frobenius_norm == 0 and got.effective_rank == 0 and got.k == 0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="one shape"):
        spectrum(torch.zeros(4, 3), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="one shape"):
        intruder_dimensions(torch.zeros(4, 3), torch.zeros(4))


# ---- the bound ----------------------------------------------------------------------------------------

SMOLLM2_QV = [(576, 576), (192, 576)] * 30   # q 576 -> 576 and v 576 -> 192 in each of 30 layers


def formula(r, q, sigma, k, s, n):
    return math.sqrt(2 * r * q * sigma ** 2 * k * math.log(2) * s / n)


@pytest.mark.parametrize("method", list(METHODS))
def test_bound_terms_follow_the_formula_for_each_method(method):
    got = bound_terms(method, SMOLLM2_QV, rank=16, chain_segments=3, n_examples=5000, bits=16, sigma=0.5)
    sum_n = 30 * (576 + 192)
    s, r, k = {"full": (30 * (576 * 576 + 192 * 576), 1, 1),
               "lora": (sum_n + 30 * 2 * 576, 16, 1), "lora_plus": (sum_n + 30 * 2 * 576, 16, 1),
               "cola": (sum_n + 30 * 2 * 576, 16, 3),
               "asym": (sum_n, 16, 1), "paca": (sum_n, 16, 1), "cla": (sum_n, 16, 1), "r_cla": (sum_n, 16, 1),
               "rac": (sum_n, 16, 3), "c3la": (sum_n, 16, 3), "r_c3la": (sum_n, 16, 3)}[method]
    assert (got.S, got.rank, got.segments) == (s, r, k)
    assert got.term == pytest.approx(formula(r, 16, 0.5, k, s, 5000), rel=1e-12)


@pytest.mark.parametrize("method,params", [("lora", 589_824), ("cla", 294_912), ("asym", 294_912)])
def test_r_times_s_is_the_specs_parameter_count(method, params):
    """docs/specs: BERT-base shape, q and v of 12 layers at r = 16."""
    assert bound_terms(method, [(768, 768)] * 24, rank=16).trained_bits == 32 * params


def test_the_bound_orders_methods_as_their_trained_bits():
    terms = {m: bound_terms(m, SMOLLM2_QV, rank=16, n_examples=1000).term for m in METHODS}
    assert terms["cla"] == terms["asym"] == terms["paca"] < terms["lora"] < terms["cola"] < terms["full"]
    assert terms["c3la"] == terms["rac"] == pytest.approx(math.sqrt(3) * terms["cla"])


def test_bad_bound_arguments_name_the_problem():
    with pytest.raises(ValueError, match="unknown method 'dora'; valid: full, lora"):
        bound_terms("dora", SMOLLM2_QV, rank=16)
    with pytest.raises(ValueError, match="no adapted matrix shapes"):
        bound_terms("lora", [], rank=16)
    with pytest.raises(ValueError, match="n_examples"):
        bound_terms("lora", SMOLLM2_QV, rank=16, n_examples=0)


# ---- the gap --------------------------------------------------------------------------------------------

class Regression(nn.Module):
    """loss = mean squared error of a linear map after dropout (which eval mode switches off)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, y):
        return type("Out", (), {"loss": ((self.drop(x) @ self.w - y) ** 2).mean()})()


def test_the_gap_is_test_minus_train_loss_in_eval_mode():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(5, generator=g)
    model = Regression(w.clone()).train()
    train = [{"x": torch.randn(4, 5, generator=g), "y": torch.randn(4, generator=g)} for _ in range(3)]
    test = [{"x": torch.randn(2, 5, generator=g), "y": torch.randn(2, generator=g)},
            {"x": torch.randn(6, 5, generator=g), "y": torch.randn(6, generator=g)}]

    def exact(batches):   # per-example mean over all examples: batches of unequal size weigh by their size
        x = torch.cat([b["x"] for b in batches])
        y = torch.cat([b["y"] for b in batches])
        return float(((x @ w - y) ** 2).mean())

    got = generalization_gap(model, train, test)
    assert got.train_loss == pytest.approx(exact(train), rel=1e-6)
    assert got.test_loss == pytest.approx(exact(test), rel=1e-6)
    assert got.gap == pytest.approx(exact(test) - exact(train), rel=1e-6)
    assert model.training   # its mode is given back
    with pytest.raises(ValueError, match="no examples"):
        mean_loss(model, [])


# ---- a saved adapter's updates --------------------------------------------------------------------------

def causal_lm() -> nn.Module:
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


@pytest.mark.parametrize("method", ["lora", "cla", "c3la", "paca"])
def test_updates_of_a_saved_adapter_are_the_live_adapters(method, tmp_path):
    model = causal_lm()
    base = copy.deepcopy(model)
    pristine = {k: v.clone() for k, v in base.state_dict().items()}
    handle = trained_adapter(model, AdapterConfig(method=method, rank=4))
    want = {name: f.delta() for name, f in factors(handle).items()}
    handle.save(tmp_path)
    got = updates(base, tmp_path)
    assert set(got) == set(want) and len(got) == 2 * base.config.num_hidden_layers
    for name, (w0, dw) in got.items():
        torch.testing.assert_close(w0, pristine[f"{name}.weight"])
        torch.testing.assert_close(dw, want[name], rtol=1e-5, atol=1e-6)
        assert dw.abs().sum() > 0
    assert all(torch.equal(v, pristine[k]) for k, v in base.state_dict().items())   # the base is untouched


def test_updates_of_full_fine_tuning_are_the_trained_minus_the_pretrained_targets(tmp_path):
    model = causal_lm()
    base = copy.deepcopy(model)
    pristine = {k: v.clone() for k, v in base.state_dict().items()}
    handle = trained_adapter(model, AdapterConfig(method="full", rank=4))
    with torch.no_grad():
        for p in handle.adapter_parameters():
            p.add_(0.01)
    handle.save(tmp_path)
    got = updates(base, tmp_path)
    assert sorted(got) == sorted(n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj")))
    for name, (w0, dw) in got.items():
        torch.testing.assert_close(w0 + dw, model.get_submodule(name).weight.detach(), rtol=0, atol=1e-6)
        assert dw.abs().min() > 0
    assert all(torch.equal(v, pristine[k]) for k, v in base.state_dict().items())

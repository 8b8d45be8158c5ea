"""The selector methods must be cheap: a gather instead of a 0/1 matmul, one GEMM forward, and only
x[..., idx] (width r) saved for backward."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from adapters import METHODS, AdapterConfig, apply
from adapters.layers import _SelectorLinearFn

M, N_OUT, R = 96, 80, 8
SELECTORS = [m for m, s in METHODS.items() if s.layer == "selector"]
MATMULS = {"mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "mv", "dot"}


def adapted_layer(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(M, N_OUT))
    h = apply(model, AdapterConfig(method=method, rank=R, targets=["0"]))
    layer = model[0]
    with torch.no_grad():  # a non-zero update, as after some training
        for p in layer.trained().values():
            p.normal_()
    return h, layer


def saved_activations(layer, x):
    params = {p.data_ptr() for p in layer.parameters()} | {b.data_ptr() for b in layer.buffers()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return saved


@pytest.mark.parametrize("method", SELECTORS)
def test_selector_layers_save_only_width_r(method):
    _, layer = adapted_layer(method)
    x = torch.randn(3, 5, M, requires_grad=True)   # gradients flow through, as in a deep model
    saved = saved_activations(layer, x)
    assert saved, "nothing saved: the adapter would get no gradient"
    assert all(t.shape[-1] == R for t in saved), [tuple(t.shape) for t in saved]
    assert sum(t.numel() for t in saved) == 3 * 5 * R


def test_lora_saves_the_full_input():
    _, layer = adapted_layer("lora")
    saved = saved_activations(layer, torch.randn(3, 5, M, requires_grad=True))
    assert any(t.shape[-1] == M for t in saved)


class MatmulLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATMULS:
            self.calls.append([a for a in args if isinstance(a, torch.Tensor)])
        return func(*args, **(kwargs or {}))


def is_zero_one(t):
    return t.is_floating_point() and bool(((t == 0) | (t == 1)).all())


@pytest.mark.parametrize("method", SELECTORS)
def test_selector_forward_is_one_gemm_and_no_dense_selector(method):
    _, layer = adapted_layer(method)
    x = torch.randn(4, M)
    with MatmulLog() as log:
        layer(x)
    assert len(log.calls) == 1, f"{len(log.calls)} matmuls in the forward"
    assert not any(is_zero_one(t) for t in log.calls[0])
    assert any(tuple(t.shape) in {(N_OUT, M), (M, N_OUT)} for t in log.calls[0])  # the patched W


def test_lora_forward_takes_three_gemms():
    _, layer = adapted_layer("lora")
    with MatmulLog() as log:
        layer(torch.randn(4, M))
    assert len(log.calls) == 3


@pytest.mark.parametrize("replace", [False, True])
def test_selector_function_gradients_are_exact(replace):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 10, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    cols = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([1, 4, 5, 9])
    assert torch.autograd.gradcheck(lambda x, b, c: _SelectorLinearFn.apply(x, w, b, c, idx, 2.0, replace),
                                    (x, b, cols))


@pytest.mark.parametrize("method", SELECTORS)
def test_selector_layer_matches_its_dense_definition(method):
    _, layer = adapted_layer(method)
    x = torch.randn(6, M, requires_grad=True)
    w0 = layer.base_layer.weight.detach()
    a = torch.zeros(R, M)
    a[torch.arange(R), layer.idx] = 1.0   # the dense 0/1 selector the layer must never build
    if layer.columns:
        dense_w = w0.clone()
        dense_w[:, layer.idx] = layer.cols
    else:
        dense_w = w0 + layer.scale * layer.cols @ a
    ref = x @ dense_w.t() + layer.base_layer.bias
    torch.testing.assert_close(layer(x), ref)
    g_ref = torch.autograd.grad(ref.square().sum(), (x, layer.cols))
    g = torch.autograd.grad(layer(x).square().sum(), (x, layer.cols))
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method,shared", [("cla", True), ("c3la", True), ("r_cla", False)])
def test_q_and_v_with_one_selector_save_one_gather(method, shared):
    """q and v read the same hidden states: with the same columns they keep one (..., r) copy."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"q": nn.Linear(M, N_OUT), "v": nn.Linear(M, N_OUT)})
    apply(model, AdapterConfig(method=method, rank=R, targets=["q", "v"]))
    x = torch.randn(3, 5, M, requires_grad=True)
    storages = {}

    def pack(t):
        if t.shape[-1] == R and t.dim() == 3:
            storages[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (model["q"](x) + model["v"](x)).sum().backward()
    assert len(storages) == (1 if shared else 2)
    x2 = x.detach().clone().requires_grad_()   # a new input never reuses the old gather
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model["q"](x2).sum().backward()
    assert len(storages) == (2 if shared else 3)


def test_loaded_selectors_do_not_share_a_stale_gather():
    """load_state_dict (DeepSpeed's resume) rewrites the idx buffers in place: q and v, which shared
    cla's columns [0, r), must each gather their loaded columns, as layers built with them do."""
    from .conftest import batch, tiny_model

    def adapted():
        model = tiny_model("llama")
        h = apply(model, AdapterConfig(method="cla", rank=R // 2))
        return model, h

    model, h = adapted()
    ids, labels = batch(model)
    model(ids, labels=labels).loss.backward()   # a forward with the initial (shared) columns first
    model.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    loaded = {}
    for name, layer in h.layers.items():
        idx = torch.randperm(layer.in_features, generator=gen)[:layer.rank].sort().values
        loaded[name] = idx
        state[f"{name}.idx"] = idx
        state[f"{name}.lora_B"] = torch.randn(layer.out_features, layer.rank, generator=gen)
    q, v = (next(n for n in loaded if n.endswith(f"layers.0.self_attn.{p}")) for p in ("q_proj", "v_proj"))
    assert not torch.equal(loaded[q], loaded[v]) and not torch.equal(loaded[q], torch.arange(R // 2))
    model.load_state_dict(state)

    fresh, fh = adapted()
    fresh.load_state_dict({k: t for k, t in state.items() if not k.endswith(".idx")}, strict=False)
    for name, layer in fh.layers.items():
        layer.set_selector(loaded[name])
    for m in (model, fresh):
        m(ids, labels=labels).loss.backward()
    for name in loaded:
        assert torch.equal(h.layers[name].idx, fh.layers[name].idx)
        torch.testing.assert_close(h.layers[name].lora_B.grad, fh.layers[name].lora_B.grad, rtol=0, atol=0,
                                   msg=lambda m: f"{name}: {m}")

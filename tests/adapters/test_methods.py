"""Every method on every architecture: step 0, one optimizer step, chaining, merge and save/load."""
import pytest
import torch

from adapters import METHODS, AdapterConfig, SelectorLinear, apply, chain_boundaries, load

from .conftest import batch, tiny_model

RANK = 4
SELECTOR_METHODS = [m for m, s in METHODS.items() if s.layer == "selector"]
CHAINED = [m for m, s in METHODS.items() if s.chained]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def one_step(model, handle, ids, labels, lr=1e-2):
    opt = torch.optim.AdamW(handle.param_groups(lr, weight_decay=0.01))
    model(ids, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("method", list(METHODS))
def test_step_zero_leaves_outputs_unchanged(arch, method):
    model = tiny_model(arch)
    ids, _ = batch(model)
    before = logits(model, ids)
    apply(model, AdapterConfig(method=method, rank=RANK))
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_one_step_moves_only_what_the_method_trains(arch, method):
    model = tiny_model(arch)
    ids, labels = batch(model)
    h = apply(model, AdapterConfig(method=method, rank=RANK))
    trained = {id(p) for p in h.adapter_parameters() + h.head_parameters()}
    names_trained = {n for n, p in model.named_parameters() if id(p) in trained}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in trained}
    eff_before = {n: layer.effective_weight().detach().clone() for n, layer in h.layers.items()}
    before = snapshot(model)

    one_step(model, h, ids, labels)

    after = snapshot(model)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed, "nothing moved"
    assert changed <= names_trained, f"frozen tensors moved: {sorted(changed - names_trained)[:5]}"
    for n, t in frozen_before.items():
        assert torch.equal(after[n], t), n
    assert any(n.split(".")[0] in h.config.head for n in changed), "the task head did not train"
    if method == "full":
        assert len(changed) > len(names_trained) // 2
        return
    # B (or P) of every adapted layer moved (at step 1 LoRA's A gets no gradient because B = 0).
    for name, layer in h.layers.items():
        cols = layer.cols if isinstance(layer, SelectorLinear) else layer.lora_B
        key = [n for n, p in model.named_parameters() if p is cols][0]
        assert key in changed, f"{key} did not move"
        if method in SELECTOR_METHODS:
            moved = (layer.effective_weight().detach() - eff_before[name]).abs().sum(0) > 0
            selected = torch.zeros_like(moved)
            selected[layer.idx] = True
            assert moved.any() and not (moved & ~selected).any(), f"{name}: columns outside idx moved"


@pytest.mark.parametrize("method", CHAINED)
def test_chain_step_keeps_function_and_moves_selector(arch, method):
    model = tiny_model(arch)
    ids, labels = batch(model)
    cfg = AdapterConfig(method=method, rank=RANK, chain_segments=3)
    h = apply(model, cfg)
    opt = one_step(model, h, ids, labels)
    layer = next(iter(h.layers.values()))
    before_idx = layer.idx.clone() if isinstance(layer, SelectorLinear) else None
    before_a = getattr(layer, "lora_A", None)
    before_a = before_a.detach().clone() if before_a is not None else None
    out_before = logits(model, ids)
    assert any(opt.state[p] for p in h.adapter_parameters())

    h.chain_step(opt)

    torch.testing.assert_close(logits(model, ids), out_before, rtol=1e-5, atol=1e-5)
    assert h.segment == 1 and layer.segment == 1
    assert not any(opt.state.get(p) for p in h.adapter_parameters()), "adapter optimizer state kept"
    assert all(opt.state.get(p) for p in h.head_parameters()), "the head lost its optimizer state"
    if method == "c3la":
        assert torch.equal(layer.idx, torch.arange(RANK, 2 * RANK))
    elif method == "r_c3la":
        assert not torch.equal(layer.idx, before_idx)
        assert layer.idx[0] % RANK == 0 and torch.equal(layer.idx, torch.arange(layer.idx[0], layer.idx[0] + RANK))
    else:  # cola, rac: a fresh A, B back to zero
        assert not torch.equal(layer.lora_A, before_a)
    cols = layer.cols if isinstance(layer, SelectorLinear) else layer.lora_B
    assert torch.count_nonzero(cols) == 0


def test_r_c3la_walks_every_window_once_per_cycle():
    model = tiny_model("llama")
    h = apply(model, AdapterConfig(method="r_c3la", rank=RANK, chain_segments=100))
    layer = next(iter(h.layers.values()))
    n_windows = layer.in_features // RANK
    seen = []
    for _ in range(n_windows):
        seen.append(int(layer.idx[0]) // RANK)
        h.chain_step()
    assert sorted(seen) == list(range(n_windows)) and seen != list(range(n_windows))
    assert int(layer.idx[0]) // RANK == seen[0]  # cyclic


@pytest.mark.parametrize("method", ["r_cla", "r_c3la", "paca"])
def test_random_selectors_reproducible_and_distinct(method):
    def selectors(seed):
        h = apply(tiny_model("llama"), AdapterConfig(method=method, rank=RANK, seed=seed))
        return [layer.idx.clone() for layer in h.layers.values()]

    a, b, c = selectors(0), selectors(0), selectors(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c)), "seed does not change the selectors"
    if method != "r_c3la":  # random windows can coincide by chance across few layers
        assert len({tuple(x.tolist()) for x in a}) > 1, "every layer drew the same columns"
    for x in a:
        assert torch.equal(x, x.sort().values) and len(set(x.tolist())) == RANK


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_and_merge_reproduce_outputs(arch, method, tmp_path):
    model = tiny_model(arch)
    ids, labels = batch(model)
    h = apply(model, AdapterConfig(method=method, rank=RANK, seed=3))
    for step in range(1, 4):
        opt = one_step(model, h, ids, labels)
        if step in chain_boundaries(3, 2):
            h.chain_step(opt)
    tuned = logits(model, ids)
    h.save(tmp_path)

    fresh = tiny_model(arch)
    assert not torch.allclose(logits(fresh, ids), tuned)
    h2 = load(fresh, tmp_path)
    assert h2.segment == h.segment
    torch.testing.assert_close(logits(fresh, ids), tuned, rtol=0, atol=0)

    adapted = list(h.layers)
    merged = h.merge()
    assert not any("lora" in n or "paca" in n for n, _ in merged.named_parameters())
    for name in adapted:  # plain layers are back (GPT-2's split c_attn fused again)
        name = name.rsplit(".", 1)[0] if name.endswith(("c_attn.q", "c_attn.v")) else name
        assert type(merged.get_submodule(name)).__name__ in {"Linear", "Conv1D"}
    torch.testing.assert_close(logits(merged, ids), tuned, rtol=1e-5, atol=1e-5)


def test_lora_plus_groups_and_no_decay_on_adapters():
    h = apply(tiny_model("bert"), AdapterConfig(method="lora_plus", rank=RANK, lora_plus_ratio=16.0))
    groups = {g["name"]: g for g in h.param_groups(1e-3, weight_decay=0.1)}
    assert groups["adapter_A"]["lr"] == 1e-3 and groups["adapter_B"]["lr"] == pytest.approx(1.6e-2)
    assert groups["adapter_A"]["weight_decay"] == groups["adapter_B"]["weight_decay"] == 0.0
    assert groups["head"]["weight_decay"] == 0.1 and groups["head_no_decay"]["weight_decay"] == 0.0
    lora = {g["name"]: g for g in apply(tiny_model("bert"), AdapterConfig(method="lora", rank=RANK))
            .param_groups(1e-3)}
    assert lora["adapter_B"]["lr"] == 1e-3
    n_grouped = sum(p.numel() for g in groups.values() for p in g["params"] if g["name"].startswith("adapter"))
    assert n_grouped == h.num_trainable()


def test_chain_boundaries_split_steps_evenly():
    assert chain_boundaries(9, 3) == [3, 6]
    assert chain_boundaries(10, 1) == []
    assert chain_boundaries(100, 4) == [25, 50, 75]


def test_non_chained_chain_step_is_a_noop():
    model = tiny_model("bert")
    h = apply(model, AdapterConfig(method="cla", rank=RANK))
    idx = next(iter(h.layers.values())).idx.clone()
    h.chain_step()
    assert h.segment == 0 and torch.equal(next(iter(h.layers.values())).idx, idx)


def test_merged_handle_refuses_to_train():
    h = apply(tiny_model("bert"), AdapterConfig(method="lora", rank=RANK))
    h.merge()
    with pytest.raises(RuntimeError, match="merged"):
        h.chain_step()

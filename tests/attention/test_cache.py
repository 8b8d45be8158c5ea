"""The in-place KV cache, its kept key bounds, and prefill/greedy decode with explicit positions."""
import math

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from attention import ARTConfig, enable_art, new_cache
from attention.cache import GrowingLayer, block_balls, key_bounds, tile_cache
from attention.generate import greedy_decode, prefill
from attention.hf import make_press
from attention.reference import block_balls as reference_balls, block_key_bounds

from .test_hf import PROMPT, greedy, tiny_llm


def states(n, seed, b=2, h=3, d=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


def test_growing_layer_holds_what_a_dynamic_layer_holds():
    grow, ref = GrowingLayer(), DynamicLayer()
    for i, n in enumerate([300, 1, 1, 40, 1] + [1] * 300):
        k, v = states(n, i)
        gk, gv = grow.update(k, v)
        rk, rv = ref.update(k, v)
        assert torch.equal(gk, rk) and torch.equal(gv, rv)
    assert grow.get_seq_length() == ref.get_seq_length() == 643
    buf = grow._kbuf
    grow.update(*states(1, 999))
    assert grow._kbuf is buf   # room to spare: appended in place, no copy
    grow.crop(600)
    assert grow.get_seq_length() == 600 and torch.equal(grow.keys, ref.keys[:, :, :600])


def test_assigned_keys_are_adopted_and_grown():
    layer = GrowingLayer()
    layer.update(*states(100, 0))
    k, v = states(50, 1)
    layer.keys, layer.values = k, v           # what a kvpress press does after prefill
    assert layer.keys is k and layer.get_seq_length() == 50
    k2, v2 = states(1, 2)
    keys, values = layer.update(k2, v2)
    assert torch.equal(keys, torch.cat([k, k2], 2)) and torch.equal(values, torch.cat([v, v2], 2))


@pytest.mark.parametrize("block", [16, 64])
def test_kept_key_bounds_follow_the_appends(block):
    layer = GrowingLayer()
    keys, _ = layer.update(*states(150, 0))
    for step in range(120):
        if step % 7 == 0:
            kmin, kmax, nb = key_bounds(keys, block)
            want = block_key_bounds(keys, torch.ones(2, keys.shape[2], dtype=torch.bool), block)
            assert nb == math.ceil(keys.shape[2] / block) and kmin.shape[2] >= nb
            assert key_bounds(keys, block, partial=False)[2] == keys.shape[2] // block
            assert torch.equal(kmin[:, :, :nb], want[0]) and torch.equal(kmax[:, :, :nb], want[1])
        keys, _ = layer.update(*states(1, step + 1))
    assert key_bounds(keys.clone(), block) is None            # not a view of a cache we own
    layer.keys, layer.values = keys[:, :, :10].clone(), keys[:, :, :10].clone()
    assert layer._bounds is None                              # reassigned: summaries dropped


def check_kept_balls(keys, values, block, want_keys=True, want_values=True):
    kept = block_balls(keys, values, block, want_keys, want_values)
    assert kept is not None and kept[4] == keys.shape[2] // block
    ones = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool)
    for x, (c, r), wanted in ((keys, kept[:2], want_keys), (values, kept[2:4], want_values)):
        if not wanted:
            assert c is None and r is None
            continue
        center, radius = reference_balls(x, ones, block)   # from scratch over the whole cache
        assert c.shape[2] == r.shape[2] == kept[4]
        assert torch.equal(c, center[:, :, : kept[4]]) and torch.equal(r, radius[:, :, : kept[4]])


@pytest.mark.parametrize("block", [16, 64])
def test_kept_balls_follow_appends_crops_and_assignments(block):
    layer = GrowingLayer()
    keys, values = layer.update(*states(150, 0))
    assert block_balls(keys, values, block)[4] == 150 // block and layer._balls
    check_kept_balls(keys, values, block, want_values=False)
    for step, n in enumerate([1, 3, 40, 1, 17, 70, 1, 1, 33] + [1] * 20):   # appends crossing block boundaries
        keys, values = layer.update(*states(n, step + 1))
        check_kept_balls(keys, values, block, want_keys=step % 3 != 1, want_values=step % 4 != 2)
    layer.crop(keys.shape[2] - 2 * block - 5)                       # crop: the kept balls are dropped
    assert not layer._balls
    keys, values = layer.keys, layer.values
    check_kept_balls(keys, values, block)
    keys, values = layer.update(*states(2 * block + 9, 100))
    check_kept_balls(keys, values, block)
    k, v = states(3 * block + 7, 101)
    layer.keys, layer.values = k, v                                 # what a kvpress press does after prefill
    assert not layer._balls and block_balls(k, v, block) is None   # not a buffer we own yet
    for step in range(block + 3):
        keys, values = layer.update(*states(1, 200 + step))
        check_kept_balls(keys, values, block)
    check_kept_balls(keys, values, block // 2)                     # another block size: summarised anew
    assert block_balls(keys, values.clone(), block) is None        # values that are not this cache's
    assert block_balls(keys.clone(), values, block) is None


def test_kept_balls_summarise_each_complete_block_once(monkeypatch):
    import attention.cache as kv_cache

    read = []
    real = kv_cache.reference.block_balls
    monkeypatch.setattr(kv_cache.reference, "block_balls", lambda x, valid, bs: read.append(x.shape[2]) or
                        real(x, valid, bs))
    layer = GrowingLayer()
    keys, values = layer.update(*states(40, 0))
    for step in range(100):
        block_balls(keys, values, 16)
        keys, values = layer.update(*states(1, step + 1))
    assert sum(read) == 2 * (139 // 16) * 16   # keys and values of each complete block, once
    assert block_balls(keys, values, 16, want_values=False)[2] is None


def test_new_cache_generates_like_stock_and_tiles():
    model = tiny_llm()
    stock = greedy(model, PROMPT)
    cache = new_cache(model)
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    with torch.no_grad():
        out = model.generate(PROMPT, past_key_values=cache, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                             pad_token_id=0)
    assert torch.equal(out, stock)
    state = prefill(model, PROMPT)
    tiled = tile_cache(state.cache, 3, model)
    assert tiled.layers[0].keys.shape[0] == 3
    assert torch.equal(tiled.layers[0].keys[2], state.cache.layers[0].keys[0])


def test_greedy_decode_equals_generate_with_padding_and_art():
    model = tiny_llm()
    ids = torch.randint(3, 256, (2, 150), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :40], mask[0, :40] = 0, 0
    stock = greedy(model, ids, mask=mask)[:, 150:]
    assert torch.equal(greedy_decode(model, prefill(model, ids, mask), 12).tokens, stock)
    with enable_art(model, ARTConfig(mode="certified", eps=0.0, block_size=16)):
        decoded = greedy_decode(model, prefill(model, ids, mask), 12)
    assert torch.equal(decoded.tokens, stock) and len(decoded.step_seconds) == 11


def test_positions_count_the_real_prompt_under_a_press():
    """After a press drops half of the prompt's cache, the next token's position is still the prompt
    length (generate would use the shorter cache length)."""
    model = tiny_llm()
    with make_press("streaming", 0.5)(model):
        state = prefill(model, PROMPT)
    assert state.cache.get_seq_length() == 100 and state.position.item() == 200
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(model, state, 0)
    with pytest.raises(ValueError, match="unpadded prompts"):
        with make_press("streaming", 0.5)(model):
            prefill(model, PROMPT, torch.ones_like(PROMPT))

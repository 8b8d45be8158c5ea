"""H2OPress: scores are the accumulated attention mass, the cache keeps the top-scored positions,
generation runs under it, and a ratio of 0 changes nothing."""
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from attention import ARTConfig, enable_art
from attention.h2o_press import H2OPress
from workers.data.assets import load_model

PROMPT = torch.randint(3, 256, (1, 300), generator=torch.Generator().manual_seed(0))   # > one chunk of 256


def tiny_llm(dtype=None):
    model, _ = load_model("random:llama-tiny", task="causal_lm", max_position_embeddings=512, dtype=dtype)
    return model.eval()


def greedy(model, ids, n=12):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def recording(press):
    """Make `press` keep the scores it computes, by layer index."""
    scores, score = {}, press.score

    def keep(module, *args):
        scores[module.layer_idx] = out = score(module, *args)
        return out

    press.score = keep
    return scores


def prefill(model, ids, press=None):
    cache = DynamicCache(config=model.config)   # as generate builds it: sliding layers stay sliding
    with torch.no_grad():
        if press is None:
            model(ids, past_key_values=cache, use_cache=True)
        else:
            with press(model):
                model(ids, past_key_values=cache, use_cache=True)
    return cache


def brute_force_mass(model, ids):
    """Per layer, fp64 (batch, kv_heads, T): the full T x T causal softmax attention rebuilt from each
    layer's input with transformers' own RoPE and repeat_kv, summed over queries and each group's heads."""
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        position_ids = torch.arange(ids.shape[1])[None]
        masses = []
        for layer, h in zip(model.model.layers, hidden):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            shape = (*x.shape[:-1], -1, attn.head_dim)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            cos, sin = model.model.rotary_emb(x, position_ids)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            logits = q @ repeat_kv(k, attn.num_key_value_groups).transpose(2, 3) * attn.scaling
            t = ids.shape[1]
            logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            probs = logits.softmax(-1)                                   # (b, heads, T, T), explicit
            mass = probs.sum(2)                                          # over queries
            masses.append(mass.view(mass.shape[0], k.shape[1], -1, t).sum(2))   # over each group's heads
    return masses


@pytest.mark.parametrize("window", [None, 100])
def test_scores_are_the_accumulated_attention_mass(window):
    model = tiny_llm(torch.float64)
    press = H2OPress(compression_ratio=0.5, window=window, recent_size=0)
    scores = recording(press)
    prefill(model, PROMPT, press)
    want = brute_force_mass(model, PROMPT) if window is None else None
    if window is not None:   # only the last `window` queries count: rebuild from the full matrix's rows
        model.config._attn_implementation = "eager"
        with torch.no_grad():
            attentions = model(PROMPT, output_attentions=True).attentions
        want = [a[:, :, -window:].sum(2).view(1, 2, 2, -1).sum(2) for a in attentions]
    assert sorted(scores) == [0, 1]
    for layer, mass in enumerate(want):
        assert scores[layer].shape == (1, 2, 300) and scores[layer].dtype == torch.float64
        # eager attention takes its softmax in fp32, hence the looser tolerance for the window case
        tol = 1e-12 if window is None else 1e-5
        torch.testing.assert_close(scores[layer], mass, rtol=tol, atol=tol)
        # every query's row sums to one per head: the total mass is (queries x heads per group)
        assert scores[layer].sum().item() == pytest.approx((window or 300) * 4)


def test_scores_match_eager_attention_weights():
    """The same sums taken from the model's own eager attention weights (fp32 softmax)."""
    model = tiny_llm()
    press = H2OPress(compression_ratio=0.5, recent_size=0)
    scores = recording(press)
    prefill(model, PROMPT, press)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = model(PROMPT, output_attentions=True).attentions
    for layer, a in enumerate(attentions):
        torch.testing.assert_close(scores[layer], a.sum(2).view(1, 2, 2, -1).sum(2), rtol=1e-4, atol=1e-4)


def test_half_ratio_keeps_exactly_the_top_scored_half():
    model = tiny_llm()
    dense = prefill(model, PROMPT)
    press = H2OPress(compression_ratio=0.5)
    scores = recording(press)
    pressed = prefill(model, PROMPT, press)
    for layer, (d, p) in enumerate(zip(dense.layers, pressed.layers)):
        s = scores[layer]
        assert d.keys.shape == (1, 2, 300, 8) and p.keys.shape == p.values.shape == (1, 2, 150, 8)
        # the newest 64 positions are protected above every other score
        assert torch.all(s[..., -64:] > s[..., :-64].amax(-1, keepdim=True))
        kept = s.topk(150, dim=-1).indices
        idx = kept[..., None].expand(-1, -1, -1, 8)
        assert torch.equal(p.keys, d.keys.gather(2, idx)) and torch.equal(p.values, d.values.gather(2, idx))
        dropped = torch.ones_like(s, dtype=torch.bool).scatter(-1, kept, False)
        assert s.gather(-1, kept).amin() >= s.masked_fill(~dropped, float("inf")).amin(-1).amax()
        # heavy hitters, not a recency window: many kept positions are older than the newest 150
        assert (kept < 150).sum() > 20


def test_generation_runs_and_differs_from_dense_at_a_high_ratio():
    model = tiny_llm()
    dense = greedy(model, PROMPT)
    with H2OPress(compression_ratio=0.9, recent_size=8)(model):
        pressed = greedy(model, PROMPT)
    assert pressed.shape == dense.shape == (1, 312)
    assert torch.equal(pressed[:, :300], PROMPT) and not torch.equal(pressed, dense)
    assert torch.equal(greedy(model, PROMPT), dense)   # the hooks are gone


def test_ratio_zero_is_a_no_op():
    model = tiny_llm()
    press = H2OPress(compression_ratio=0.0)
    scores = recording(press)
    dense = greedy(model, PROMPT)
    with press(model):
        out = greedy(model, PROMPT)
    cache = prefill(model, PROMPT, press)
    assert torch.equal(out, dense) and scores == {}   # nothing is even scored
    assert [layer.keys.shape[2] for layer in cache.layers] == [300, 300]


def test_art_decodes_on_top_of_the_press():
    """kvpress is imported and its hooks run; certified ART with eps 0 equals the press alone."""
    model = tiny_llm()
    press = H2OPress(compression_ratio=0.5)
    with press(model):
        pressed = greedy(model, PROMPT)
    with press(model), enable_art(model, ARTConfig(mode="certified", eps=0.0, block_size=16)):
        out = greedy(model, PROMPT)
        stats = model.art_stats()
    assert torch.equal(out, pressed)
    # 150 kept + s generated positions per decode step, ceil(/16) blocks, 2 layers x 2 kv heads
    assert stats.candidate_blocks == sum(-(-(150 + s) // 16) for s in range(1, 12)) * 4


def test_sliding_window_layers_are_left_alone_on_gemma3():
    model, _ = load_model("random:gemma3-tiny", task="causal_lm", max_position_embeddings=512,
                          num_hidden_layers=2, sliding_window=64,
                          layer_types=["sliding_attention", "full_attention"])
    model.eval()
    cache = prefill(model, PROMPT, H2OPress(compression_ratio=0.5))
    assert [layer.keys.shape[2] for layer in cache.layers] == [63, 150]
    with H2OPress(compression_ratio=0.5)(model):
        assert greedy(model, PROMPT, n=4).shape == (1, 304)


def test_importing_attention_leaves_kvpress_alone():
    code = ("import sys, attention; "
            "assert 'kvpress' not in sys.modules and 'attention.h2o_press' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_attention_is_recomputed_in_chunks_of_queries():
    """No tensor of the score is as large as a full T x T attention matrix per head."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    model = tiny_llm()
    press = H2OPress(compression_ratio=0.5, chunk_size=64)
    score, sizes = press.score, []

    def measured(*args):
        with LargestOutput() as mode:
            out = score(*args)
        sizes.append(mode.numel)
        return out

    press.score = measured
    prefill(model, PROMPT, press)
    heads = model.config.num_attention_heads
    assert len(sizes) == 2 and all(64 * 300 * heads // 2 < n <= 64 * 300 * heads for n in sizes), sizes

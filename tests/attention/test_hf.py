"""ART inside transformers' generate: off equals stock, stats are collected, the model is restored."""
import math

import pytest
import torch

from attention import ARTConfig, enable_art
from workers.data.assets import load_model


def tiny_llm():
    model, _ = load_model("random:llama-tiny", task="causal_lm", max_position_embeddings=512)
    return model.eval()


def greedy(model, ids, n=12, mask=None):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                              pad_token_id=0)


PROMPT = torch.randint(3, 256, (1, 200), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cfg", [ARTConfig(mode="off"), ARTConfig(mode="certified", eps=0.0, block_size=16),
                                 ARTConfig(tau=0.0, phi=0.0, block_size=32)])
def test_generation_without_truncation_equals_stock(cfg):
    model = tiny_llm()
    stock = greedy(model, PROMPT)
    with enable_art(model, cfg) as art:
        out = greedy(model, PROMPT)
        stats = model.art_stats()
    assert torch.equal(out, stock)
    layers = model.config.num_hidden_layers
    assert stats.decode_steps == 11 and len(stats.per_layer) == layers
    if cfg.active:
        assert stats.skipped_fraction == 0.0
        # each decode step sees 200 + step positions: ceil(T / block) blocks per kv head per layer
        want = sum(-(-(200 + s) // cfg.block_size) for s in range(1, 12)) * layers * model.config.num_key_value_heads
        assert stats.candidate_blocks == want
    assert art.stats() == stats


def test_truncating_art_skips_blocks_and_leaves_prefill_alone():
    model = tiny_llm()
    with torch.no_grad():
        stock = model(PROMPT).logits[:, -1]
    cfg = ARTConfig(tau=1.0, phi=1.0, patience=1, min_blocks=1, block_size=16)
    with enable_art(model, cfg):
        out = greedy(model, PROMPT, n=4)
        stats = model.art_stats()
    assert stats.skipped_fraction > 0.5 and out.shape == (1, 204)
    with torch.no_grad():   # prefill is untouched by ART
        torch.testing.assert_close(model(PROMPT).logits[:, -1], stock)


def test_left_padded_batches_match_stock():
    model = tiny_llm()
    ids = torch.randint(3, 256, (2, 150), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :40], mask[0, :40] = 0, 0
    stock = greedy(model, ids, mask=mask)
    with enable_art(model, ARTConfig(mode="certified", eps=0.0, block_size=16)):
        out = greedy(model, ids, mask=mask)
    assert torch.equal(out, stock)


def test_disable_restores_the_model():
    model = tiny_llm()
    before = model.config._attn_implementation
    session = enable_art(model, ARTConfig())
    with pytest.raises(ValueError, match="already enabled"):
        enable_art(model, ARTConfig())
    session.disable()
    assert model.config._attn_implementation == before
    assert not any(hasattr(m, "_sparta_art") for m in model.modules()) and not hasattr(model, "art_stats")
    assert torch.equal(greedy(model, PROMPT, n=3), greedy(tiny_llm(), PROMPT, n=3))


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown KV policy 'tova'; valid: dense, streaming, snapkv"):
        enable_art(tiny_llm(), ARTConfig(), policy="tova")
    with pytest.raises(ValueError, match="policy_ratio"):
        enable_art(tiny_llm(), ARTConfig(), policy="snapkv", policy_ratio=1.0)


@pytest.mark.parametrize("policy", ["streaming", "snapkv", "pyramidkv", "h2o"])
def test_art_on_top_of_a_kv_policy(policy):
    """The press shrinks what ART walks; with nothing truncated ART equals the press alone."""
    from attention.hf import make_press

    model = tiny_llm()
    with make_press(policy, 0.5)(model):
        pressed = greedy(model, PROMPT)
    with enable_art(model, ARTConfig(mode="certified", eps=0.0, block_size=16), policy, 0.5):
        out = greedy(model, PROMPT)
        stats = model.art_stats()
    with enable_art(model, ARTConfig(mode="certified", eps=0.0, block_size=16)):
        greedy(model, PROMPT)
        dense = model.art_stats()
    assert torch.equal(out, pressed)
    assert dense.candidate_blocks * 0.4 < stats.candidate_blocks < dense.candidate_blocks * 0.6
    assert torch.equal(greedy(model, PROMPT), greedy(tiny_llm(), PROMPT))   # the press is gone again


def test_quest_keeps_a_budget_of_blocks_per_step():
    model = tiny_llm()
    with enable_art(model, ARTConfig(mode="certified", eps=0.0, block_size=16), "quest", 0.75):
        out = greedy(model, PROMPT)
        quest = model.art_stats()
    with enable_art(model, ARTConfig(mode="certified", eps=0.0, block_size=16)):
        greedy(model, PROMPT)
        dense = model.art_stats()
    assert out.shape == (1, 212)
    heads = model.config.num_hidden_layers * model.config.num_key_value_heads
    budgets = [math.ceil(0.25 * math.ceil((200 + s) / 16)) for s in range(1, 12)]   # 4 of 13-14 blocks
    assert quest.candidate_blocks == sum(budgets) * heads == quest.visited_blocks
    assert dense.candidate_blocks == sum(math.ceil((200 + s) / 16) for s in range(1, 12)) * heads


def test_ratio_zero_is_an_exact_no_op():
    from attention.hf import make_press

    assert make_press("snapkv", 0.0) is None and make_press("dense", 0.5) is None


@pytest.mark.slow
def test_passkey_in_a_2k_haystack_is_answered_the_same_with_certified_art():
    from workers.data.haystack import passkey_prompt

    model, tok = load_model("smollm2-135m", task="causal_lm")
    model.eval()
    cfg = ARTConfig(mode="certified", eps=1e-4)
    answers = []
    for depth, key in [(0.2, "68194"), (0.5, "30517"), (0.8, "92746")]:
        enc = tok(passkey_prompt(tok, 1900, depth, key), return_tensors="pt", add_special_tokens=False)
        assert 1900 < enc["input_ids"].shape[1] < 2100
        stock = greedy(model, enc["input_ids"], n=14, mask=enc["attention_mask"])
        with enable_art(model, cfg):
            art = greedy(model, enc["input_ids"], n=14, mask=enc["attention_mask"])
            stats = model.art_stats()
        assert stats.decode_steps == 13 and stats.candidate_blocks > 0
        n = enc["input_ids"].shape[1]
        answers.append((tok.decode(stock[0, n:]), tok.decode(art[0, n:]), key))
    assert [a for a, _, _ in answers] == [b for _, b, _ in answers], answers
    assert sum(key in a for a, _, key in answers) >= 2, answers   # the model does find the needle


def test_certified_bound_is_verified_on_every_decode_call():
    model = tiny_llm()
    cfg = ARTConfig(mode="certified", eps=0.05, block_size=16)
    with enable_art(model, cfg, verify_bound=True):
        greedy(model, PROMPT, n=5)
        stats = model.art_stats()
    heads = model.config.num_attention_heads * model.config.num_hidden_layers
    assert stats.bound_checked == 4 * heads and stats.bound_violations == 0
    assert 0.0 <= stats.bound_worst <= 1.0
    with enable_art(model, ARTConfig(tau=1.0, phi=1.0, patience=1, min_blocks=1), verify_bound=True):
        greedy(model, PROMPT, n=3)
        assert model.art_stats().bound_checked == 0   # stability mode makes no guarantee to check


@pytest.mark.parametrize("cfg", [ARTConfig(tau=0.5, phi=0.5, patience=1, min_blocks=1, block_size=16, order="bound"),
                                 ARTConfig(mode="certified", eps=0.05, block_size=16),
                                 ARTConfig(tau=0.5, phi=0.5, patience=2, block_size=32)])
@pytest.mark.parametrize("kept", [True, False], ids=["new_cache", "DynamicCache"])
def test_cpu_kernel_path_decides_like_the_reference(cfg, kept):
    """The lean CPU path (key bounds kept with our cache, the newest block summarised in the kernel)
    visits exactly the blocks the reference visits, step after step."""
    from attention import new_cache

    model = tiny_llm()
    runs = []
    for impl in ("cpu", "reference"):
        with enable_art(model, cfg, impl=impl):
            with torch.no_grad():
                out = model.generate(PROMPT, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
                                     past_key_values=new_cache(model) if kept else None)
            stats = model.art_stats()
        runs.append((out, stats.per_layer, stats.visited_blocks))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    if cfg.mode == "stability":
        assert runs[0][2] < sum(c for _, c in runs[0][1].values())   # it did skip blocks



# (config, factor on the q and k projections: sharper attention, so that skip mode skips on a random model)
BALL_CONFIGS = [(ARTConfig(mode="certified", eps=0.05, block_size=16, score_bound="box+ball", certificate="relative"), 1),
                (ARTConfig(mode="certified", eps=0.1, block_size=16, score_bound="box+ball", certificate="absolute"), 1),
                (ARTConfig(mode="skip", skip_lambda=0.5, block_size=16, order="bound", score_bound="box+ball"), 40)]


@pytest.mark.parametrize("impl", ["cpu", "reference"])
@pytest.mark.parametrize("cfg, sharpen", BALL_CONFIGS,
                         ids=["certified-box+ball-relative", "certified-box+ball-absolute", "skip-bound-box+ball"])
def test_kept_balls_decide_like_balls_from_scratch(cfg, sharpen, impl):
    """Key and value balls kept with our cache (the complete blocks summarised once, the newest in each
    call) give the same tokens and the same visited blocks, layer by layer, as balls computed from the
    whole cache at every call (a plain DynamicCache), and certified mode's bound holds on every call."""
    from attention import new_cache
    from attention.cache import GrowingLayer

    model = tiny_llm()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= sharpen
            layer.self_attn.k_proj.weight *= sharpen
    ids = torch.randint(3, 256, (2, 150), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :40], mask[0, :40] = 0, 0   # left padding: kept blocks holding masked positions are summarised again
    runs = []
    for prompt, attn in ((PROMPT, None), (ids, mask)):
        for kept in (True, False):
            cache = new_cache(model) if kept else None
            with enable_art(model, cfg, impl=impl, verify_bound=True):
                with torch.no_grad():
                    out = model.generate(prompt, attention_mask=attn, max_new_tokens=10, min_new_tokens=10,
                                         do_sample=False, pad_token_id=0, past_key_values=cache)
                stats = model.art_stats()
            if kept:
                assert all(isinstance(layer, GrowingLayer) and layer._balls for layer in cache.layers)
            if cfg.mode == "certified":
                assert stats.bound_checked > 0 and stats.bound_violations == 0
            runs.append((out, stats.per_layer))
        assert torch.equal(runs[-2][0], runs[-1][0]) and runs[-2][1] == runs[-1][1]
    if cfg.certificate != "relative":   # (on a random model the relative certificate visits every block)
        assert sum(v for v, _ in runs[0][1].values()) < sum(c for _, c in runs[0][1].values())   # it did skip

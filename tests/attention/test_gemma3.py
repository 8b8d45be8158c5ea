"""ART on Gemma-3: sliding-window layers (5 of 6) and one KV head. Off and exact certified ART equal stock
generation token for token; a truncating config skips blocks."""
import pytest
import torch
from transformers import DynamicCache

from attention import ARTConfig, enable_art
from workers.data.assets import load_model

WINDOW = 64
PROMPT = torch.randint(3, 256, (1, 200), generator=torch.Generator().manual_seed(0))   # > the window


def tiny_gemma3(sliding_window=WINDOW):
    # 6 layers: 5 sliding-window layers and a full one, as in every Gemma-3 block of six
    model, _ = load_model("random:gemma3-tiny", task="causal_lm", max_position_embeddings=512,
                          num_hidden_layers=6, num_key_value_heads=1, sliding_window=sliding_window)
    return model.eval()


def greedy(model, ids, n=12, **kw):
    return greedy_with_logits(model, ids, n, **kw)[0]


def greedy_with_logits(model, ids, n=12, **kw):
    """The tokens and the logits of each step, (n, batch, vocab): random tiny models often repeat one
    token, so the logits are what shows a small change."""
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits)


def test_the_tiny_model_is_gemma3_shaped_and_its_window_matters():
    model = tiny_gemma3()
    assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert model.config.num_key_value_heads == 1 and model.config.sliding_window == WINDOW
    assert not torch.equal(greedy(model, PROMPT), greedy(tiny_gemma3(sliding_window=512), PROMPT))


@pytest.mark.parametrize("cfg", [ARTConfig(mode="off"), ARTConfig(mode="certified", eps=0.0, block_size=16)])
def test_generation_without_truncation_equals_stock(cfg):
    model = tiny_gemma3()
    stock, stock_logits = greedy_with_logits(model, PROMPT)
    with enable_art(model, cfg):
        out, logits = greedy_with_logits(model, PROMPT)
        stats = model.art_stats()
    assert out.shape == (1, 212) and torch.equal(out, stock)
    torch.testing.assert_close(logits, stock_logits, rtol=1e-4, atol=1e-4)
    assert stats.decode_steps == 11 and sorted(stats.per_layer) == list(range(6))
    if cfg.active:
        assert stats.skipped_fraction == 0.0
        # a sliding layer's cache holds window - 1 positions plus the new one: 64 keys, 4 blocks per step;
        # the full layer sees all 200 + s positions
        for layer in range(5):
            assert stats.per_layer[layer] == (11 * 4, 11 * 4)
        full = sum(-(-(200 + s) // 16) for s in range(1, 12))
        assert stats.per_layer[5] == (full, full)


def test_a_cache_without_sliding_layers_gets_the_window_from_the_mask():
    """With a plain DynamicCache every layer keeps all positions; the sliding mask must still apply."""
    model = tiny_gemma3()
    stock, stock_logits = greedy_with_logits(model, PROMPT, past_key_values=DynamicCache())
    with enable_art(model, ARTConfig(mode="certified", eps=0.0, block_size=16)):
        out, logits = greedy_with_logits(model, PROMPT, past_key_values=DynamicCache())
        stats = model.art_stats()
    assert torch.equal(stock, greedy(model, PROMPT))   # precondition: the same model output either way
    assert torch.equal(out, stock)
    torch.testing.assert_close(logits, stock_logits, rtol=1e-4, atol=1e-4)
    # only the blocks that hold the last 64 positions are candidates: 4 or 5 of them, never all 13-14
    assert all(11 * 4 <= stats.per_layer[layer][1] <= 11 * 5 for layer in range(5))


def test_left_padded_batches_match_stock():
    model = tiny_gemma3()
    ids = torch.randint(3, 256, (2, 150), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :100], mask[0, :100] = 0, 0   # the short row lies inside the window, its padding outside
    stock, stock_logits = greedy_with_logits(model, ids, attention_mask=mask)
    with enable_art(model, ARTConfig(mode="certified", eps=0.0, block_size=16)):
        out, logits = greedy_with_logits(model, ids, attention_mask=mask)
    assert torch.equal(out, stock)
    torch.testing.assert_close(logits, stock_logits, rtol=1e-4, atol=1e-4)


def test_truncating_art_runs_and_skips_blocks():
    model = tiny_gemma3()
    cfg = ARTConfig(tau=1.0, phi=1.0, patience=1, min_blocks=1, block_size=16)
    with enable_art(model, cfg):
        out = greedy(model, PROMPT)
        stats = model.art_stats()
    assert out.shape == (1, 212) and torch.equal(out[:, :200], PROMPT)
    assert stats.skipped_fraction > 0
    assert all(visited < candidates for visited, candidates in stats.per_layer.values())


@pytest.mark.slow
def test_real_gemma3_270m_answers_the_same_with_certified_art():
    """The packaged Gemma-3-270M (GGUF, exported once: ~45 s, then ~5 s a load) continues a prompt
    sensibly, and certified ART (eps 1e-4) gives the same tokens."""
    model, tok = load_model("gemma3-270m", task="causal_lm")
    model.eval()
    assert model.config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    # the tokenizer is Gemma's BPE: <bos> first, whole words as one token
    assert tok.tokenize(" capital of Germany") == ["▁capital", "▁of", "▁Germany"]
    enc = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    assert enc["input_ids"][0, 0] == tok.bos_token_id == 2
    n = enc["input_ids"].shape[1]
    stock = greedy(model, enc["input_ids"], n=8, attention_mask=enc["attention_mask"])
    with enable_art(model, ARTConfig(mode="certified", eps=1e-4)):
        art = greedy(model, enc["input_ids"], n=8, attention_mask=enc["attention_mask"])
        stats = model.art_stats()
    text = tok.decode(stock[0, n:])
    assert text.startswith(" Berlin"), text
    assert torch.equal(art, stock), (text, tok.decode(art[0, n:]))
    assert stats.decode_steps == 7 and stats.candidate_blocks > 0


def test_a_kv_press_compresses_only_the_full_layers_and_decodes():
    """kvpress skips sliding layers only for Gemma3ForConditionalGeneration; on the text-only model `pressed`
    keeps each sliding layer's window whole (its mask assumes it) and compresses the full layer."""
    from attention.cache import new_cache
    from attention.generate import decode, prefill
    from attention.hf import make_press, pressed

    model = tiny_gemma3()
    press = make_press("snapkv", 0.5)
    with pressed(press, model):
        state = prefill(model, PROMPT, cache=new_cache(model))
    lengths = [layer.keys.shape[-2] for layer in state.cache.layers]
    assert lengths[:5] == [WINDOW - 1] * 5 and lengths[5] == 100   # window - 1 kept; half of 200 positions
    with enable_art(model, ARTConfig(mode="walk", block_size=16)):
        out = decode(model, state, 6)
    assert out.tokens.shape == (1, 6)
    # and nothing stays hooked: a later prefill keeps every position
    plain = prefill(model, PROMPT, cache=new_cache(model))
    assert [layer.keys.shape[-2] for layer in plain.cache.layers][5] == 200

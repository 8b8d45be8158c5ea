"""The reference ART decode attention: exact when off, bounded error when it stops, stats that add up."""
import math

import pytest
import torch

from attention import ARTConfig
from attention.reference import decode_attention
from attention.reference import STOP_CERTIFIED, STOP_STABLE


def exact(q, k, v, valid):
    """fp64 softmax attention over the valid positions ((b, T), or (b, hq, T) per query head), and
    its probabilities (b, hq, T)."""
    b, hq, _, d = q.shape
    g = hq // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = (q.double() @ kk.transpose(-1, -2)).squeeze(2) / math.sqrt(d)
    p = s.masked_fill(~(valid if valid.dim() == 3 else valid[:, None, :]), -math.inf).softmax(-1)
    return (p[:, :, None, :] @ vv), p


def seen_positions(stats, valid, block_size, group):
    """(b, hq, T): the valid positions in the blocks each query head's group visited."""
    blk_of = torch.arange(valid.shape[-1]) // block_size
    return stats.visited_mask.repeat_interleave(group, 1)[:, :, blk_of] & valid[:, None, :]


def check_truncation(q, k, v, valid, out, stats, block_size):
    """ART's output is exact attention over what it visited (fp32 vs fp64), and the truncation it
    made is bounded: ||o_true - o_visited|| <= 2 W max||v||, W the true unvisited softmax mass."""
    group = q.shape[1] // k.shape[1]
    seen = seen_positions(stats, valid, block_size, group)
    o_visited, _ = exact(q, k, v, seen)
    # fp32 scores of the peaked inputs reach ~300, so their rounding alone moves weights by ~2e-5
    torch.testing.assert_close(out.double(), o_visited, rtol=1e-4, atol=5e-5)
    o_true, p = exact(q, k, v, valid)
    w = (p * ~seen).sum(-1)
    vmax = v.double().norm(dim=-1).amax(-1).repeat_interleave(group, 1)
    trunc = (o_true - o_visited).norm(dim=-1).squeeze(-1)
    assert (trunc <= 2 * w * vmax + 1e-12).all()
    return w


def inputs(b=3, hq=8, hkv=2, t=1000, d=32, seed=0, peaked=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g)
    v = torch.randn(b, hkv, t, d, generator=g)
    if peaked:   # attention sinks and a few heavy positions dominate, as in trained LLMs
        qg = torch.randn(b, hkv, 1, d, generator=g)     # the heads of a group look alike
        q = (qg + 0.3 * q.view(b, hkv, hq // hkv, d)).reshape(b, hq, 1, d)
        direction = (qg / qg.norm(dim=-1, keepdim=True)).squeeze(2)
        k = 0.1 * k
        k[:, :, :4] += 12.0 * math.sqrt(d) * direction[:, :, None, :]
        k[:, :, -3:] += 6.0 * math.sqrt(d) * direction[:, :, None, :]
    return q, k, v


def ragged(b, t):
    lengths = torch.tensor([t, t - 37, t // 2 + 5][:b])
    return lengths, torch.arange(t)[None, :] < lengths[:, None]


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (9, 3)])
@pytest.mark.parametrize("t", [64, 1000])
def test_off_equals_dense(hq, hkv, t):
    q, k, v = inputs(hq=hq, hkv=hkv, t=t)
    lengths, valid = ragged(3, t)
    want, _ = exact(q, k, v, valid)
    out, stats = decode_attention(q, k, v, ARTConfig(mode="off"), lengths=lengths)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert stats.skipped_fraction == 0.0
    assert stats.candidate_blocks[1, 0] == math.ceil((t - 37) / 64)
    torch.testing.assert_close(decode_attention(q, k, v, ARTConfig(enabled=False), lengths=lengths)[0], out)


@pytest.mark.parametrize("mode", ["stability", "certified"])
def test_never_stopping_walks_everything_and_equals_dense(mode):
    q, k, v = inputs(t=777)
    lengths, valid = ragged(3, 777)
    cfg = ARTConfig(mode=mode, tau=0.0, phi=0.0, eps=0.0, block_size=32)
    out, stats = decode_attention(q, k, v, cfg, lengths=lengths)
    torch.testing.assert_close(out.double(), exact(q, k, v, valid)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(stats.visited_blocks, stats.candidate_blocks) and stats.skipped_fraction == 0


@pytest.mark.parametrize("peaked", [False, True])
@pytest.mark.parametrize("eps", [1e-2, 1e-4])
def test_certified_error_within_bound(peaked, eps):
    q, k, v = inputs(t=2000, peaked=peaked, seed=1)
    lengths, valid = ragged(3, 2000)
    out, stats = decode_attention(q, k, v, ARTConfig(mode="certified", eps=eps), lengths=lengths)
    want, p = exact(q, k, v, valid)
    err = (out.double() - want).norm(dim=-1).squeeze(-1)                # (b, hq)
    vmax = v.double().norm(dim=-1).amax(-1).repeat_interleave(q.shape[1] // k.shape[1], 1)
    assert (err <= 2 * eps * vmax + 1e-6).all()
    w = check_truncation(q, k, v, valid, out, stats, 64)
    assert (w <= eps).all()
    if peaked:
        assert stats.skipped_fraction > 0.5
        assert (stats.stop_reason == STOP_CERTIFIED).all()


def test_stability_skips_on_peaked_inputs_but_never_sink_or_recent():
    q, k, v = inputs(t=2048, peaked=True, seed=2)
    lengths, valid = ragged(3, 2048)
    out, stats = decode_attention(q, k, v, ARTConfig.preset("paper"), lengths=lengths)
    assert stats.skipped_fraction > 0.5 and (stats.stop_reason == STOP_STABLE).all()
    last = (lengths - 1) // 64
    for b in range(3):
        assert stats.visited_mask[b, :, 0].all() and stats.visited_mask[b, :, last[b]].all()
    # paper defaults: sink + recent, then patience (5) stable blocks
    assert (stats.visited_blocks == 2 + 5).all()
    check_truncation(q, k, v, valid, out, stats, 64)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("cfg", [ARTConfig(tau=1e-3, phi=1e-2, patience=2, block_size=16),
                                 ARTConfig(tau=1e-2, phi=1e-1, patience=1, min_blocks=1, block_size=32),
                                 ARTConfig(mode="certified", eps=0.05, block_size=16)])
def test_truncation_error_never_exceeds_twice_unvisited_mass(seed, cfg):
    """||o_true - o_partial|| <= 2 W max||v||, W the true softmax mass of the unvisited blocks."""
    q, k, v = inputs(t=600, seed=seed, peaked=seed % 2 == 1)
    lengths, valid = ragged(3, 600)
    out, stats = decode_attention(q, k, v, cfg, lengths=lengths)
    check_truncation(q, k, v, valid, out, stats, cfg.block_size)
    if seed % 2 == 1:   # on peaked inputs these loose settings do stop early
        assert stats.skipped_fraction > 0


def test_policy_scores_order_the_rest():
    q, k, v = inputs(b=1, t=64 * 10)
    scores = torch.zeros(1, 2, 10)
    scores[..., 4] = 5.0
    cfg = ARTConfig(tau=1.0, phi=1.0, patience=1, min_blocks=1, sink_tokens=4, recent_blocks=1)
    _, stats = decode_attention(q, k, v, cfg, block_scores=scores)
    # sink (0) and newest (9) are protected; the first scored block is the best one (4)
    assert stats.visited_mask[0, :, [0, 9, 4]].all() and stats.visited_blocks.eq(3).all()
    _, newest_first = decode_attention(q, k, v, cfg)
    assert newest_first.visited_mask[0, :, [0, 9, 8]].all()


def test_bfloat16_inputs_keep_fp32_state():
    q, k, v = inputs(t=300)
    out, _ = decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), ARTConfig(tau=0, phi=0))
    want, _ = exact(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), torch.ones(3, 300, dtype=torch.bool))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("field,value", [("mode", "fast"), ("block_size", 0), ("tau", -1e-7), ("phi", -1.0),
                                         ("patience", 0), ("eps", 1.0), ("recent_blocks", -1)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ARTConfig(**{field: value})


def test_presets_and_overrides():
    paper = ARTConfig.preset("paper")
    assert (paper.mode, paper.tau, paper.phi, paper.patience) == ("stability", 1e-7, 1e-3, 5)
    assert ARTConfig.preset("paper") is not paper
    assert paper.with_overrides(patience=3).patience == 3
    with pytest.raises(ValueError, match="unknown ART field.*patiencee"):
        paper.with_overrides(patiencee=3)
    with pytest.raises(ValueError, match="unknown ART preset 'fast'; valid: paper, certified, tuned, aggressive"):
        ARTConfig.preset("fast")


def test_parse_art_overrides_are_checked_not_coerced():
    from attention import parse_art

    cfg = parse_art("tuned+block_size=32+tau=3e-3+patience=1e1+order=recency")
    assert (cfg.block_size, cfg.tau, cfg.patience, cfg.order) == (32, 3e-3, 10, "recency")
    assert type(cfg.block_size) is int and type(cfg.patience) is int
    for text, enabled in [("true", True), ("YES", True), ("1", True), ("False", False), ("no", False), ("0", False)]:
        assert parse_art(f"paper+enabled={text}").enabled is enabled, text
    for bad, words in [("tuned+block_size=32.5", "'block_size'.*'32.5' is not an integer"),
                       ("tuned+patience=2.0001", "'patience'.*'2.0001' is not an integer"),
                       ("tuned+min_blocks=inf", "'min_blocks'.*'inf' is not an integer"),
                       ("tuned+enabled=maybe", "'enabled'.*'maybe' is not a boolean; valid: true, false, 1, 0, yes, no"),
                       ("tuned+enabled=", "'enabled'.*'' is not a boolean"),
                       ("tuned+tau=fast", "'tau'.*'fast' is not a number")]:
        with pytest.raises(ValueError, match=words):
            parse_art(bad)


def test_bad_shapes_and_lengths():
    q, k, v = inputs(t=100)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        decode_attention(q[:, :3], k, v, ARTConfig())
    with pytest.raises(ValueError, match="lengths"):
        decode_attention(q, k, v, ARTConfig(), lengths=torch.tensor([0, 5, 5]))


@pytest.mark.parametrize("mode", ["off", "stability", "certified"])
def test_quest_budget_keeps_the_best_bounded_blocks(mode):
    """Quest: per (sequence, kv head) only `block_budget` blocks (best key-bound scores, sink and newest
    always) are candidates; the output is exact attention over them when nothing else is cut."""
    q, k, v = inputs(t=1024, peaked=True, seed=5)
    lengths, valid = ragged(3, 1024)
    cfg = ARTConfig(mode=mode, tau=0.0, phi=0.0, eps=0.0, block_size=64)
    out, stats = decode_attention(q, k, v, cfg, lengths=lengths, block_budget=5)
    assert (stats.candidate_blocks == 5).all() and torch.equal(stats.visited_blocks, stats.candidate_blocks)
    last = (lengths - 1) // 64
    for b in range(3):
        assert stats.visited_mask[b, :, 0].all() and stats.visited_mask[b, :, last[b]].all()
    seen = seen_positions(stats, valid, 64, 4)
    torch.testing.assert_close(out.double(), exact(q, k, v, seen)[0], rtol=1e-4, atol=5e-5)
    # the heavy positions are in the sink and newest blocks, so keeping 5 blocks loses almost nothing
    torch.testing.assert_close(out.double(), exact(q, k, v, valid)[0], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="block_budget"):
        decode_attention(q, k, v, cfg, block_budget=0)

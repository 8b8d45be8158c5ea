"""The reference ART decode attention: exact when off, bounded error when it stops, stats that add up."""
import math

import pytest
import torch

import torch.nn.functional as F

from attention import ARTConfig
from attention.reference import decode_attention
from attention.reference import (STOP_CERTIFIED, STOP_EXHAUSTED, STOP_STABLE, ball_bounds, block_balls,
                                 block_key_bounds, certified_error, plan_walk, upper_bounds, value_spread)


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


def structured(b=3, hq=8, hkv=2, t=700, d=64, seed=0, block_size=32, top=1.0, noise=0.15, low=None):
    """Keys clustered per block (a centroid plus small noise), each block with its own weight along the
    query direction (scores spread over ~8 `top` nats), sinks and the newest keys heavier still: inputs on
    which the bounds are informative and every criterion skips some blocks but not all. low: a block given
    the lowest weight (0)."""
    g = torch.Generator().manual_seed(seed)
    qg = torch.randn(b, hkv, 1, d, generator=g)
    q = (qg + 0.3 * torch.randn(b, hkv, hq // hkv, d, generator=g)).reshape(b, hq, 1, d)
    direction = qg / qg.norm(dim=-1, keepdim=True)
    nb = -(-t // block_size)
    level = top * torch.rand(b, hkv, nb, 1, generator=g)
    if low is not None:
        level[:, :, low] = 0.0
    center = level * math.sqrt(d) * direction + 0.5 * torch.randn(b, hkv, nb, d, generator=g)
    k = center.repeat_interleave(block_size, 2)[:, :, :t] + noise * math.sqrt(d) / 8 * torch.randn(b, hkv, t, d, generator=g)
    k[:, :, :4] += 1.5 * top * math.sqrt(d) * direction
    k[:, :, -3:] += top * math.sqrt(d) * direction
    v = torch.randn(b, hkv, t, d, generator=g)
    return q, k, v


def needle(seed=0, at=1, block_size=32, **kwargs):
    """`structured` inputs with a needle in block `at` (by default the oldest block after the sink's, the
    one a newest-first walk reaches last): one key that the group's query heads score above the sinks."""
    q, k, v = structured(seed=seed, block_size=block_size, **kwargs)
    b, hkv, _, d = k.shape
    qg = q.view(b, hkv, -1, d).mean(2)
    k[:, :, at * block_size + 7] = 2.5 * math.sqrt(d) * qg / qg.norm(dim=-1, keepdim=True)
    return q, k, v


def heavy_values(seed=0, at=5, block_size=32, **kwargs):
    """`structured` inputs whose block `at` has the lowest scores and values 100 times the others' norm:
    little softmax mass, much of the output (what a keys-only certificate cannot see)."""
    q, k, v = structured(seed=seed, block_size=block_size, low=at, **kwargs)
    v[:, :, at * block_size: (at + 1) * block_size] *= 100.0
    return q, k, v


def value_bound(q, k, v, valid, visited, block_size, ball=False):
    """The value-aware certificate's bound (`certified_error`, from the reference's own summaries) for the
    partial output over the `visited` blocks (b, hkv, nb), and the true error of that partial output
    against exact attention; both (b, hq), in fp64 where the attention is concerned."""
    b, hq, _, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g, nb = hq // hkv, visited.shape[-1]
    qs = q.float().view(b, hkv, g, d) * d ** -0.5
    ub = upper_bounds(qs, *block_key_bounds(k, valid, block_size))
    if ball:
        ub = torch.minimum(ub, ball_bounds(qs, *block_balls(k, valid, block_size)))
    n_valid = F.pad(valid, (0, nb * block_size - t)).view(b, nb, block_size).sum(-1)
    mean, spread = value_spread(v, valid, block_size, n_valid)
    seen = visited.repeat_interleave(g, 1)[:, :, torch.arange(t) // block_size] & valid[:, None, :]
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)).squeeze(2) * d ** -0.5
    s = s.masked_fill(~seen, -math.inf)
    m = s.amax(-1)
    p = torch.exp(s - m[..., None])
    l = p.sum(-1)
    o = (p[:, :, None, :] @ v.double().repeat_interleave(g, 1)).squeeze(2) / l[..., None]   # (b, hq, d)
    unvisited = ((n_valid[:, None, :] > 0) & ~visited).repeat_interleave(g, 1)             # (b, hq, nb)
    mass = (n_valid[:, None, :] * torch.exp(ub.double().reshape(b, hq, nb) - m[..., None])).masked_fill(~unvisited, 0)
    spread = spread.double().repeat_interleave(g, 1)
    top = spread.masked_fill(~unvisited, 0.0).amax(-1)
    bound = certified_error(mass.sum(-1), (mass * spread).sum(-1), top, l, o,
                            mean.double().repeat_interleave(g, 1))
    true = (exact(q, k, v, valid)[0].squeeze(2) - o).norm(dim=-1)
    return bound, true


def check_certificate(q, k, v, valid, out, cfg):
    """The value-aware guarantee of an output: within eps ||out|| (relative) or eps (absolute) of exact
    attention (fp64), with room for fp32 rounding only. Returns the errors (b, hq)."""
    err = (out.double() - exact(q, k, v, valid)[0]).norm(dim=-1).squeeze(-1)
    limit = cfg.eps * (out.double().norm(dim=-1).squeeze(-1) if cfg.certificate == "relative" else 1.0)
    assert (err <= limit + 1e-5).all(), (err - limit).max()
    return err


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
    with pytest.raises(ValueError, match="unknown ART preset 'fast'; valid: paper, certified, tuned, aggressive, skip, walk"):
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


# ---- the value-aware certificate, box+ball bounds and the skip comparator -------------------------------

@pytest.mark.parametrize("ball", [False, True], ids=["box", "box+ball"])
@pytest.mark.parametrize("case", ["random", "structured", "needle", "heavy-values"])
def test_value_aware_bound_holds_for_any_visited_set(case, ball):
    """certified_error >= the true error of the partial output, whatever was visited: prefixes of the
    bound order, and the adversarial sets that leave out the needle's block or the heavy values' block."""
    bs = 32
    q, k, v = {"random": lambda: inputs(t=700, d=64, seed=4), "structured": lambda: structured(seed=4),
               "needle": lambda: needle(seed=4, at=5), "heavy-values": lambda: heavy_values(seed=4, at=5)}[case]()
    b, hkv, t = k.shape[0], k.shape[1], k.shape[2]
    lengths, valid = ragged(b, t)
    nb = -(-t // bs)
    cfg = ARTConfig(mode="certified", certificate="relative", block_size=bs, score_bound="box+ball" if ball else "box")
    order = plan_walk(q, k, v, cfg, lengths=lengths).order
    sets = [torch.zeros(b, hkv, nb, dtype=torch.bool).scatter(-1, order[..., :n], True) for n in (1, 2, 4, 8)]
    if case in ("needle", "heavy-values"):   # every candidate block but block 5
        left_out = torch.ones(b, hkv, nb, dtype=torch.bool)
        left_out[..., 5] = False
        sets.append(left_out)
    for visited in sets:
        bound, true = value_bound(q, k, v, valid, visited, bs, ball=ball)
        assert (true <= bound * (1 + 1e-5) + 1e-9).all(), (true - bound).max()
    if case == "needle":   # what the bound guards against: leaving out the needle moves the output a lot
        assert (true > 0.5).all() and (bound >= true).all()
    if case == "heavy-values":   # little mass, but 100-fold values: it still shows
        assert true.amax() > 1e-3


@pytest.mark.parametrize("certificate,eps", [("relative", 1e-2), ("relative", 1e-3), ("absolute", 1e-2)])
@pytest.mark.parametrize("case", ["random", "structured", "peaked", "needle", "heavy-values"])
def test_value_aware_certificate_keeps_its_promise(case, certificate, eps):
    q, k, v = {"random": lambda: inputs(t=700, d=64, seed=5), "structured": lambda: structured(seed=5),
               "peaked": lambda: inputs(t=700, d=64, seed=5, peaked=True), "needle": lambda: needle(seed=5),
               "heavy-values": lambda: heavy_values(seed=5)}[case]()
    lengths, valid = ragged(k.shape[0], k.shape[2])
    cfg = ARTConfig(mode="certified", certificate=certificate, eps=eps, block_size=32)
    out, stats = decode_attention(q, k, v, cfg, lengths=lengths)
    check_certificate(q, k, v, valid, out, cfg)
    check_truncation(q, k, v, valid, out, stats, 32)
    if case != "random":   # isotropic keys in 64 dimensions: no bound proves anything, all is walked
        assert 0.05 < stats.skipped_fraction < 1 and (stats.stop_reason == STOP_CERTIFIED).any()
    if case == "needle":   # the needle's block (the last a newest-first walk reaches) is never left out
        assert stats.visited_mask[..., 1].all()
    if case == "heavy-values":   # the heavy values make it walk further than the keys-only certificate
        _, mass = decode_attention(q, k, v, cfg.with_overrides(certificate="mass", eps=min(eps, 0.99)), lengths=lengths)
        assert (stats.visited_blocks >= mass.visited_blocks).all()
        assert stats.visited_blocks.sum() > mass.visited_blocks.sum()


def test_value_aware_certificates_stop_where_the_mass_certificate_cannot():
    """Values that all sit near one point make the output error small however much mass is unvisited."""
    q, k, v = structured(seed=6)
    v = 5.0 + 0.01 * v
    lengths, valid = ragged(3, 700)
    mass, mass_stats = decode_attention(q, k, v, ARTConfig(mode="certified", eps=1e-3, block_size=32), lengths=lengths)
    cfg = ARTConfig(mode="certified", certificate="relative", eps=1e-3, block_size=32)
    out, stats = decode_attention(q, k, v, cfg, lengths=lengths)
    assert stats.visited_blocks.sum() < mass_stats.visited_blocks.sum()
    check_certificate(q, k, v, valid, out, cfg)


def test_box_and_ball_bound_every_score_and_the_ball_tightens_clustered_keys():
    q, k, v = structured(seed=7)
    lengths, valid = ragged(3, 700)
    box = plan_walk(q, k, v, ARTConfig(mode="certified", block_size=32), lengths=lengths)
    both = plan_walk(q, k, v, ARTConfig(mode="certified", block_size=32, score_bound="box+ball"), lengths=lengths)
    s = torch.einsum("bhgd,bhtd->bhgt", box.q_scaled, k.float()).masked_fill(~valid[:, None, None, :], -math.inf)
    top = F.pad(s, (0, 22 * 32 - 700), value=-math.inf).view(3, 2, 4, 22, 32).amax(-1)
    assert (both.ub <= box.ub).all() and (top <= both.ub).all()
    cand = box.cand[:, :, None, :].expand_as(top)
    assert (both.ub < box.ub)[cand].float().mean() > 0.5    # the ball is the tighter one on most blocks
    a = decode_attention(q, k, v, ARTConfig(mode="certified", eps=1e-3, block_size=32), lengths=lengths)[1]
    cfg = ARTConfig(mode="certified", eps=1e-3, block_size=32, score_bound="box+ball")
    out, stats = decode_attention(q, k, v, cfg, lengths=lengths)
    assert stats.visited_blocks.sum() < a.visited_blocks.sum()
    check_truncation(q, k, v, valid, out, stats, 32)


@pytest.mark.parametrize("skip_lambda", [1e-6, 1e-3, 1.0])
@pytest.mark.parametrize("case", ["structured", "peaked"])
def test_skip_drops_at_most_lambda_over_t_per_position(case, skip_lambda):
    """Skip mode reads every candidate's keys and never stops; a block it skips had every score of every
    query head below m + ln(lambda / T), so its mass relative to the final running max is at most
    n_b lambda / T, and the output is exact attention over the blocks whose values it read."""
    q, k, v = structured(seed=8) if case == "structured" else inputs(t=700, d=64, seed=8, peaked=True)
    b, hq, _, d = q.shape
    lengths, valid = ragged(3, 700)
    cfg = ARTConfig(mode="skip", skip_lambda=skip_lambda, block_size=32)
    out, stats = decode_attention(q, k, v, cfg, lengths=lengths)
    assert (stats.stop_reason == STOP_EXHAUSTED).all()
    check_truncation(q, k, v, valid, out, stats, 32)
    seen = seen_positions(stats, valid, 32, hq // k.shape[1])
    dropped = valid[:, None, :] & ~seen
    s = (q.double() @ k.double().repeat_interleave(hq // k.shape[1], 1).transpose(-1, -2)).squeeze(2) * d ** -0.5
    m = s.masked_fill(~seen, -math.inf).amax(-1, keepdim=True)
    dropped_mass = torch.exp(s - m).masked_fill(~dropped, 0.0).sum(-1)
    limit = dropped.sum(-1) * skip_lambda / lengths[:, None]
    assert (dropped_mass <= limit * (1 + 1e-4)).all()
    if case == "peaked" or skip_lambda >= 1e-3:
        assert stats.skipped_fraction > 0.1
    if case == "structured" and skip_lambda == 1e-6:
        assert stats.skipped_fraction < 0.2     # a small lambda skips little


@pytest.mark.parametrize("order", ["recency", "bound"])
def test_skip_skips_exactly_what_a_brute_force_walk_skips(order):
    """The comparator against a plain loop: per (sequence, KV head), walk the blocks in the visiting order,
    keep the running max of the scores read so far, and skip a block whose every query head's largest score
    is below it + ln(lambda / T)."""
    q, k, v = structured(seed=3)
    b, hq, hkv, t, d = q.shape[0], q.shape[1], k.shape[1], k.shape[2], q.shape[-1]
    g, bs, lam = hq // hkv, 32, 0.05
    lengths, valid = ragged(3, t)
    cfg = ARTConfig(mode="skip", skip_lambda=lam, block_size=bs, order=order)
    _, stats = decode_attention(q, k, v, cfg, lengths=lengths)
    walk = plan_walk(q, k, v, cfg, lengths=lengths)
    s = torch.einsum("bhgd,bhtd->bhgt", q.double().view(b, hkv, g, d), k.double()) * d ** -0.5
    s = s.masked_fill(~valid[:, None, None, :], -math.inf)
    want = torch.zeros_like(stats.visited_mask)
    for i in range(b):
        threshold = math.log(lam) - math.log(int(valid[i].sum()))
        for h in range(hkv):
            m = torch.full((g,), -math.inf, dtype=torch.float64)
            for blk in walk.order[i, h].tolist():
                if not walk.cand[i, h, blk]:
                    continue
                top = s[i, h, :, blk * bs: (blk + 1) * bs].amax(-1)
                if bool((top - m < threshold).all()):
                    continue
                m = torch.maximum(m, top)
                want[i, h, blk] = True
    assert 0.05 < stats.skipped_fraction < 0.95
    assert torch.equal(stats.visited_mask, want)

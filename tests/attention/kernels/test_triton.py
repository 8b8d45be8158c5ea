"""The Triton ART kernel against the reference: compiled on a GPU where there is one, else on the CPU under
the Triton interpreter (tests/conftest.py)."""
import math
import warnings
from unittest.mock import patch

import pytest
import torch

from attention import ARTConfig
from attention.reference import STOP_CERTIFIED, STOP_EXHAUSTED, block_balls, block_key_bounds, decode_attention
from attention.reference import decode_rows as reference_rows
from attention.kernels import dispatch, triton_decode
from attention.kernels.dispatch import resolve
from attention.kernels.triton_decode import decode_attention_triton

from tests.attention.kernels.on_device import DEVICE, moved, on_device
from tests.attention.kernels.test_rows import FP32, Watch, assert_same_rows, pool_batch, pool_bounds
from tests.attention.test_reference import check_truncation, exact, inputs, ragged

CONFIGS = [ARTConfig(mode="off"), ARTConfig(tau=0.0, phi=0.0, block_size=32),
           ARTConfig(tau=1e-3, phi=1e-2, patience=2, block_size=16),
           ARTConfig.preset("paper", block_size=64), ARTConfig(mode="certified", eps=1e-3, block_size=32),
           ARTConfig(tau=1e-2, phi=1e-2, patience=2, block_size=16, order="bound")]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.mode}-{c.block_size}-{c.tau}-{c.order}")
@pytest.mark.parametrize("hq,hkv,peaked", [(8, 2, True), (4, 4, False), (9, 3, True)])
def test_kernel_matches_reference(cfg, hq, hkv, peaked):
    q, k, v = inputs(hq=hq, hkv=hkv, t=700, d=32, peaked=peaked, seed=3)
    lengths, _ = ragged(3, 700)
    want, ref = decode_attention(q, k, v, cfg, lengths=lengths)
    got, stats = on_device(decode_attention_triton, q, k, v, cfg, lengths=lengths)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
    assert torch.equal(stats.visited_blocks, ref.visited_blocks)
    assert torch.equal(stats.visited_mask, ref.visited_mask)
    assert torch.equal(stats.stop_reason, ref.stop_reason)
    if cfg.active and peaked and cfg.tau > 0:
        assert stats.skipped_fraction > 0


@pytest.mark.parametrize("splits", [2, 5])
def test_splits_combine_exactly_when_nothing_stops(splits):
    q, k, v = inputs(t=900, d=32, seed=4)
    lengths, valid = ragged(3, 900)
    got, stats = on_device(decode_attention_triton, q, k, v, ARTConfig(tau=0.0, phi=0.0, block_size=32), lengths=lengths,
                                         num_splits=splits)
    torch.testing.assert_close(got.double(), exact(q, k, v, valid)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(stats.visited_blocks, stats.candidate_blocks)


@pytest.mark.parametrize("block_size,max_chunk,chunks", [(8, 64, 1), (24, 64, 1), (48, 16, 3), (100, 32, 4)])
def test_any_block_size_is_padded_and_masked_in_the_kernel(block_size, max_chunk, chunks):
    """Blocks that are not a power of two >= 16 are padded (and, past max_chunk, walked in chunks)."""
    q, k, v = inputs(t=300, d=32, peaked=True, seed=5)
    lengths, _ = ragged(3, 300)
    cfg = ARTConfig(tau=1e-3, phi=1e-2, patience=2, min_blocks=1, block_size=block_size)
    want, ref = decode_attention(q, k, v, cfg, lengths=lengths)
    with patch.object(triton_decode, "MAX_CHUNK", max_chunk):
        assert triton_decode._chunking(block_size)["N_CHUNKS"] == chunks
        got, stats = on_device(decode_attention_triton, q, k, v, cfg, lengths=lengths)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
    assert torch.equal(stats.visited_mask, ref.visited_mask)
    assert torch.equal(stats.stop_reason, ref.stop_reason)


def test_resolve_on_cuda_takes_triton_for_any_block_size(monkeypatch):
    cuda = torch.device("cuda")
    assert all(resolve("auto", cuda, bs) == "triton" for bs in (8, 24, 64, 1000))
    dispatch._triton_ok.cache_clear()
    monkeypatch.setattr(triton_decode, "triton", None)
    try:
        with pytest.warns(UserWarning, match="Triton is not installed"):
            assert resolve("auto", cuda, 64) == "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # said once, not at every layer of every step
            assert resolve("auto", cuda, 32) == "reference"
    finally:
        dispatch._triton_ok.cache_clear()


@pytest.mark.parametrize("mode", ["stability", "certified"])
def test_kernel_matches_reference_under_a_quest_budget(mode):
    q, k, v = inputs(t=800, d=32, peaked=True, seed=6)
    lengths, _ = ragged(3, 800)
    cfg = ARTConfig(mode=mode, tau=1e-3, phi=1e-2, patience=2, eps=1e-3, block_size=32)
    want, ref = decode_attention(q, k, v, cfg, lengths=lengths, block_budget=8)
    got, stats = on_device(decode_attention_triton, q, k, v, cfg, lengths=lengths, block_budget=8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
    assert torch.equal(stats.visited_mask, ref.visited_mask) and (stats.candidate_blocks == 8).all()


# ---- the comparator (skip), box+ball score bounds, the value-aware certificate ----------------------------

def clustered(b=3, hq=8, hkv=2, t=700, d=32, cluster=32, seed=0):
    """(q (b, hq, 1, d), k, v (b, hkv, t, d)) whose keys come in clusters of `cluster` positions, each
    cluster's scores a few nats apart from the next (-2 to 8 nats), attention sinks 12 nats up: the walks
    below then visit some blocks and not others, so every criterion makes real decisions (and the key balls
    are tighter than the boxes)."""
    g = torch.Generator().manual_seed(seed)
    qg = torch.randn(b, hkv, 1, d, generator=g)
    q = (qg + 0.3 * torch.randn(b, hkv, hq // hkv, d, generator=g)).reshape(b, hq, 1, d)
    unit = qg / qg.norm(dim=-1, keepdim=True)
    per_nat = math.sqrt(d) / qg.norm(dim=-1, keepdim=True)   # key length along `unit` per nat of score
    n_clusters = -(-t // cluster)
    nats = -2.0 + 10.0 * torch.rand(b, hkv, n_clusters, 1, generator=g)
    centers = nats * per_nat * unit + 0.5 * torch.randn(b, hkv, n_clusters, d, generator=g)
    k = centers.repeat_interleave(cluster, 2)[:, :, :t] + 0.3 * torch.randn(b, hkv, t, d, generator=g)
    k[:, :, :4] += 12.0 * per_nat * unit
    v = torch.randn(b, hkv, t, d, generator=g)
    return q, k, v


def assert_certified(out, q, k, v, valid, cfg):
    """The value-aware certificate's promise against exact attention, per query head: ||o* - o|| <= eps ||o||
    (relative) or eps (absolute), up to fp32 rounding; and something was truncated (the promise was used)."""
    o_true, _ = exact(q, k, v, valid)
    err = (o_true - out.double()).norm(dim=-1)
    limit = cfg.eps * (out.double().norm(dim=-1) if cfg.certificate == "relative" else 1.0)
    assert (err <= limit + 5e-5).all(), (err - limit).max()
    assert err.max() > 1e-4


NEW_CRITERIA = [
    ARTConfig(mode="skip", skip_lambda=0.1, block_size=32),
    ARTConfig(mode="skip", skip_lambda=1.0, block_size=48),                 # 3 chunks of 16: two passes
    ARTConfig(mode="certified", eps=1e-3, block_size=32, score_bound="box+ball"),
    ARTConfig(mode="certified", eps=1e-2, block_size=32, certificate="relative", score_bound="box+ball"),
    ARTConfig(mode="certified", eps=3e-2, block_size=32, certificate="absolute"),
]


@pytest.mark.parametrize("cfg", NEW_CRITERIA, ids=lambda c: f"{c.mode}-{c.block_size}-{c.certificate}-{c.score_bound}")
def test_new_criteria_match_the_reference(cfg):
    q, k, v = clustered(seed=1)
    lengths, valid = ragged(3, 700)
    want, ref = decode_attention(q, k, v, cfg, lengths=lengths)
    # block 48 in 3 chunks of 16 (skip: a first pass over the keys, then the update); 32 in one chunk
    with patch.object(triton_decode, "MAX_CHUNK", 16 if cfg.block_size == 48 else triton_decode.MAX_CHUNK):
        assert triton_decode._chunking(cfg.block_size)["N_CHUNKS"] == (3 if cfg.block_size == 48 else 1)
        got, stats = on_device(decode_attention_triton, q, k, v, cfg, lengths=lengths)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
    assert torch.equal(stats.visited_blocks, ref.visited_blocks)
    assert torch.equal(stats.visited_mask, ref.visited_mask)
    assert torch.equal(stats.stop_reason, ref.stop_reason)
    assert 0.05 < stats.skipped_fraction < 0.9   # real decisions, not a walk of everything or of the sinks
    if cfg.mode == "skip":   # nothing terminates; the output is exact attention over the blocks whose values were read
        assert (stats.stop_reason == STOP_EXHAUSTED).all()
        check_truncation(q, k, v, valid, got, stats, cfg.block_size)
    else:
        assert (stats.stop_reason == STOP_CERTIFIED).any()
    if cfg.score_bound == "box+ball":   # the tighter bound visits no more blocks than the box alone, here fewer
        _, box = decode_attention(q, k, v, cfg.with_overrides(score_bound="box"), lengths=lengths)
        assert stats.visited_blocks.sum() < box.visited_blocks.sum()
    if cfg.certificate != "mass":
        assert_certified(got, q, k, v, valid, cfg)


@pytest.mark.parametrize("cfg", [c for c in NEW_CRITERIA if c.uses_ball or c.uses_values],
                         ids=lambda c: f"{c.mode}-{c.block_size}-{c.certificate}-{c.score_bound}")
def test_kept_balls_decide_like_balls_from_scratch(cfg):
    """Ball summaries kept for the first complete blocks (as attention.cache keeps them; the rest summarised
    in the call, masked kept blocks again) give the kernel the same plan: the same output and decisions."""
    q, k, v = clustered(seed=2)
    valid = torch.arange(700)[None, :] >= torch.tensor([0, 40, 101])[:, None]   # left padding
    done = 700 // cfg.block_size - 2
    ones = torch.ones(3, done * cfg.block_size, dtype=torch.bool)
    balls = (*block_balls(k[:, :, : done * cfg.block_size], ones, cfg.block_size),
             *block_balls(v[:, :, : done * cfg.block_size], ones, cfg.block_size))
    want, ref = on_device(decode_attention_triton, q, k, v, cfg, key_padding_mask=valid)
    got, stats = on_device(decode_attention_triton, q, k, v, cfg, key_padding_mask=valid, balls=balls)
    assert torch.equal(got, want)
    for name in ("visited_blocks", "visited_mask", "stop_reason"):
        assert torch.equal(getattr(stats, name), getattr(ref, name))
    assert 0 < stats.skipped_fraction


def clustered_pool(hq=8, hkv=2, t=240, d=32, seed=0):
    """`pool_batch` (window, NaN outside the rows' positions) with `clustered` keys and queries in the rows
    the batch reads, and the pool's kept key bounds for them."""
    q, k, v, rows, lengths, starts, _ = pool_batch(hq=hq, hkv=hkv, t=t, d=d, seed=seed, window=True)
    qc, kc, _ = clustered(b=len(rows), hq=hq, hkv=hkv, t=t, d=d, cluster=24, seed=seed)
    for i, (r, n) in enumerate(zip(rows.tolist(), lengths.tolist())):
        k[r, :, :n] = kc[i, :, :n]   # writes into the pool (k is a view of it)
    pool = k._base
    kept = {bs: block_key_bounds(pool, torch.ones(pool.shape[0], pool.shape[2], dtype=torch.bool), bs)
            for bs in (16, 32, 48)}
    return qc[:, :, 0], k, v, rows, lengths, starts, kept


ROWS_CRITERIA = [
    (ARTConfig(mode="skip", skip_lambda=0.1, block_size=16), None),
    (ARTConfig(mode="skip", skip_lambda=1.0, block_size=48), 16),            # 3 chunks: two passes
    (ARTConfig(mode="certified", eps=1e-2, block_size=16, certificate="relative", score_bound="box+ball"), None),
    (ARTConfig(mode="certified", eps=3e-2, block_size=32, certificate="absolute", score_bound="box+ball"), 16),
]


def criterion_id(c):
    return f"{c.mode}-{c.block_size}-{c.certificate}" if isinstance(c, ARTConfig) else str(c)


@pytest.mark.parametrize("cfg,max_chunk", ROWS_CRITERIA, ids=criterion_id)
def test_new_criteria_over_pool_rows_match_the_reference(cfg, max_chunk):
    q, k, v, rows, lengths, starts, kept = clustered_pool(seed=2)
    kwargs = dict(lengths=lengths, starts=starts, rows=rows)
    if cfg.uses_bounds:   # the pool's kept box summaries; the balls come from the rows' keys
        kwargs["key_bounds"] = pool_bounds(kept, cfg.block_size, rows, lengths)
    want = reference_rows(q, k, v, cfg, **kwargs)
    got = on_device(triton_decode.decode_rows_triton, q, k, v, cfg, max_chunk=max_chunk, **kwargs)
    assert_same_rows(got, want, FP32)
    visited, candidates = got[1], got[2]
    # real decisions: rows that stop or skip, rows that read more than one block per KV head
    assert (visited < candidates).sum() >= 2 and (visited > k.shape[1]).sum() >= 2
    if cfg.uses_values:
        valid = torch.zeros(len(rows), k.shape[2], dtype=torch.bool)
        for i, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
            valid[i, s:n] = True
        assert_certified(got[0][:, :, None], q[:, :, None], k[rows].nan_to_num(), v[rows].nan_to_num(), valid, cfg)


def test_certificate_tables_are_the_unvisited_sums():
    """The suffix tables give, after j blocks of the order, R = sum n exp(ub - m), sum n exp(ub - m) s and
    max s over the candidates not yet visited, to fp32 rounding, also over a range of bounds where one
    block outweighs the rest by far (a running total with visited blocks subtracted would lose them)."""
    g = torch.Generator().manual_seed(0)
    b, hkv, gq, nb = 2, 3, 4, 37
    ub = 60.0 * torch.rand(b, hkv, gq, nb, generator=g) - 30.0
    ub[0, 0, :, 5] = -math.inf                               # an empty block
    order = torch.rand(b, hkv, nb, generator=g).argsort(-1)
    n_valid = torch.randint(1, 65, (b, nb), generator=g)
    n_cand = torch.tensor([[37, 20, 1], [0, 36, 37]])
    spread = 3.0 * torch.rand(b, hkv, nb, generator=g)
    top, sums, wsums, top_spread = triton_decode.certificate_tables(ub, order, n_valid, n_cand, spread)
    m = 10.0 * torch.randn(b, hkv, gq, 1, generator=g)
    u = ub.double().gather(-1, order[:, :, None, :].expand_as(ub))
    n = n_valid[:, None, :].expand(b, hkv, nb).gather(-1, order).double()[:, :, None, :]
    s = spread.double().gather(-1, order)
    pos = torch.arange(nb)
    for j in range(nb):
        unvisited = (pos >= j) & (pos < n_cand[..., None])                     # (b, hkv, nb)
        mass = (n * torch.exp(u - m.double())).masked_fill(~unvisited[:, :, None, :], 0.0)
        lift = torch.exp(top[..., j:j + 1].double() - m.double())
        torch.testing.assert_close(sums[..., j].double() * lift[..., 0], mass.sum(-1), rtol=1e-6, atol=0.0)
        torch.testing.assert_close(wsums[..., j].double() * lift[..., 0], (mass * s[:, :, None, :]).sum(-1),
                                   rtol=1e-6, atol=0.0)
        assert torch.equal(top_spread[..., j].double(), s.masked_fill(~unvisited, 0.0).amax(-1))


def test_triton_implements_every_criterion():
    cuda = torch.device("cuda")
    for cfg in NEW_CRITERIA:
        assert dispatch.features(cfg) and resolve("triton", cuda, cfg.block_size, cfg) == "triton"
        assert resolve("auto", cuda, cfg.block_size, cfg) == "triton"


NO_SYNC_CRITERIA = ROWS_CRITERIA[::2] + [(ROWS_CRITERIA[3][0].with_overrides(certificate="mass"), 16)]


@pytest.mark.parametrize("cfg,max_chunk", NO_SYNC_CRITERIA, ids=criterion_id)
def test_planning_the_new_criteria_makes_no_host_synchronisation(cfg, max_chunk):
    q, k, v, rows, lengths, starts, kept = clustered_pool(seed=2)
    kwargs = dict(lengths=lengths, starts=starts, rows=rows,
                  key_bounds=pool_bounds(kept, cfg.block_size, rows, lengths))
    args, on = moved((q, k, v), DEVICE), moved(kwargs, DEVICE)
    with Watch() as watch:
        launch = triton_decode.prepare_rows(*args, cfg, max_chunk=max_chunk, **on)
    assert watch.syncs == []
    assert launch.meta["MODE"] == triton_decode.MODE_CODES[cfg.mode]
    assert launch.meta["CERT"] == (triton_decode.CERT_CODES[cfg.certificate] if cfg.mode == "certified" else 0)

"""The CPU ART kernel (attention/kernels/art_cpu.c) against the reference: same outputs, same decisions."""
import pytest
import torch

from attention import ARTConfig, decode_attention
from attention.kernels.cpu import decode_attention_cpu, decode_step
from attention.kernels.dispatch import KERNEL_FEATURES, features, resolve
from attention.reference import (STOP_CERTIFIED, STOP_EXHAUSTED, STOP_STABLE, block_balls, block_key_bounds,
                                 complete_balls, plan_walk)
from attention.reference import decode_attention as reference

from tests.attention.test_reference import (check_certificate, check_truncation, exact, heavy_values, inputs, needle,
                                            ragged, structured)

CONFIGS = [ARTConfig(tau=0.0, phi=0.0, block_size=32),
           ARTConfig(tau=1e-3, phi=1e-2, patience=2, block_size=16),
           ARTConfig.preset("paper"),
           ARTConfig(mode="certified", eps=1e-3, block_size=32),
           ARTConfig(mode="certified", eps=1e-2),
           ARTConfig(tau=1e-2, phi=1e-2, patience=2, block_size=16, order="bound"),
           ARTConfig(tau=0.05, phi=0.05, patience=1, min_blocks=1, block_size=32, order="bound", recent_blocks=2)]


def same_decisions(stats, ref):
    assert torch.equal(stats.visited_mask, ref.visited_mask)
    assert torch.equal(stats.visited_blocks, ref.visited_blocks)
    assert torch.equal(stats.candidate_blocks, ref.candidate_blocks)
    assert torch.equal(stats.stop_reason, ref.stop_reason)


def matches_reference(q, k, v, cfg, dtype):
    """The C kernel on a ragged batch of 700 positions: the reference's decisions, its output within the
    dtype's tolerance, and (fp32) exact attention over the blocks it visited. Returns its stats."""
    lengths, valid = ragged(3, 700)
    want, ref = reference(q, k, v, cfg, lengths=lengths)
    got, stats = decode_attention_cpu(q, k, v, cfg, lengths=lengths)
    same_decisions(stats, ref)
    tol = dict(rtol=1e-4, atol=5e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    if dtype == torch.float32:
        check_truncation(q, k, v, valid, got, stats, cfg.block_size)
    return stats


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.mode}-{c.block_size}-{c.tau}-{c.order}")
@pytest.mark.parametrize("hq,hkv,peaked", [(8, 2, True), (4, 4, False), (9, 3, True), (9, 3, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_matches_reference(cfg, hq, hkv, peaked, dtype):
    q, k, v = (x.to(dtype) for x in inputs(hq=hq, hkv=hkv, t=700, d=64, peaked=peaked, seed=3))
    stats = matches_reference(q, k, v, cfg, dtype)
    if peaked and cfg.tau > 0:
        assert stats.skipped_fraction > 0


@pytest.mark.parametrize("d", [32, 64, 128, 48])
def test_head_dims_and_unmasked_batches(d):
    """The specialised (64, 128), vector (multiples of 32) and generic (48) paths, without a mask."""
    q, k, v = (x.bfloat16() for x in inputs(b=2, t=515, d=d, seed=d))
    cfg = ARTConfig(tau=0.0, phi=0.0, block_size=64)
    got, stats = decode_attention_cpu(q, k, v, cfg)
    want, _ = exact(q.float(), k.float(), v.float(), torch.ones(2, 515, dtype=torch.bool))
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)
    assert (stats.candidate_blocks == 9).all() and stats.skipped_fraction == 0


@pytest.mark.parametrize("mode", ["stability", "certified"])
def test_quest_budget_and_kept_bounds_with_room(mode):
    """Key bounds may come in buffers with room for more blocks (as the cache keeps them)."""
    q, k, v = inputs(t=800, d=64, peaked=True, seed=6)
    lengths, valid = ragged(3, 800)
    cfg = ARTConfig(mode=mode, tau=1e-3, phi=1e-2, patience=2, eps=1e-3, block_size=32)
    want, ref = reference(q, k, v, cfg, lengths=lengths, block_budget=8)
    kmin, kmax = block_key_bounds(k, valid, 32)
    room = [torch.cat([b, torch.full_like(b[:, :, :5], float("nan"))], 2) for b in (kmin, kmax)]
    got, stats = decode_attention_cpu(q, k, v, cfg, lengths=lengths, block_budget=8, key_bounds=room)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
    same_decisions(stats, ref)
    assert (stats.candidate_blocks == 8).all()


def test_visiting_order_from_the_caller():
    q, k, v = inputs(b=1, t=64 * 10, d=64)
    order = torch.tensor([0, 9, 4, 3, 8, 7, 6, 5, 2, 1]).expand(1, 2, 10)
    cfg = ARTConfig(tau=1.0, phi=1.0, patience=1, min_blocks=1)
    _, stats = decode_attention_cpu(q, k, v, cfg, order=order)
    assert stats.visited_mask[0, :, [0, 9, 4]].all() and stats.visited_blocks.eq(3).all()
    assert (stats.stop_reason == STOP_STABLE).all()


def test_off_is_dense_sdpa_and_errors():
    q, k, v = inputs(t=300, d=64)
    lengths, valid = ragged(3, 300)
    out, stats = decode_attention_cpu(q, k, v, ARTConfig(mode="off"), lengths=lengths)
    torch.testing.assert_close(out.double(), exact(q, k, v, valid)[0], rtol=1e-5, atol=1e-5)
    assert stats.skipped_fraction == 0
    with pytest.raises(ValueError, match="block_scores must be"):
        decode_attention_cpu(q, k, v, ARTConfig(), block_scores=torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="key_bounds must be"):
        decode_attention_cpu(q, k, v, ARTConfig(mode="certified"), key_bounds=(torch.zeros(3, 2, 2, 64),) * 2)


def test_dispatch():
    cpu = torch.device("cpu")
    assert resolve("auto", cpu, 64) == "cpu" and resolve("reference", cpu, 64) == "reference"
    with pytest.raises(ValueError, match="unknown ART implementation 'fast'; valid: auto, reference, cpu, triton"):
        resolve("fast", cpu, 64)
    q, k, v = inputs(t=500, d=64, peaked=True)
    cfg = ARTConfig(tau=1e-3, phi=1e-2, patience=2)
    a, sa = decode_attention(q, k, v, cfg)                     # auto: the CPU kernel here
    b, sb = decode_attention(q, k, v, cfg, impl="reference")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)
    same_decisions(sa, sb)



# ---- the skip comparator, box+ball bounds and the value-aware certificate -------------------------------

NEW_CONFIGS = [ARTConfig(mode="skip", skip_lambda=1e-6, block_size=32),
               ARTConfig(mode="skip", skip_lambda=1e-3, block_size=32),
               ARTConfig(mode="skip", skip_lambda=1.0, block_size=32),
               ARTConfig(mode="skip", skip_lambda=1e-2, block_size=16, order="bound", score_bound="box+ball"),
               ARTConfig(mode="certified", eps=1e-3, block_size=32, score_bound="box+ball"),
               ARTConfig(mode="certified", eps=1e-2, block_size=32, certificate="relative"),
               ARTConfig(mode="certified", eps=1e-3, block_size=16, certificate="relative", score_bound="box+ball"),
               ARTConfig(mode="certified", eps=1e-2, block_size=32, certificate="absolute", recent_blocks=2,
                         min_blocks=1),
               ARTConfig(tau=1e-2, phi=1e-2, patience=2, block_size=16, order="bound", score_bound="box+ball")]


def new_id(c):
    return f"{c.mode}-{c.certificate if c.mode == 'certified' else c.skip_lambda}-{c.score_bound}-{c.block_size}"


@pytest.mark.parametrize("cfg", NEW_CONFIGS, ids=new_id)
@pytest.mark.parametrize("hq,hkv", [(8, 2), (9, 3), (4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_matches_reference_on_the_new_criteria(cfg, hq, hkv, dtype):
    """Clustered keys with graded block weights: every criterion skips some blocks but not all, and the
    kernel skips exactly the reference's."""
    q, k, v = (x.to(dtype) for x in structured(hq=hq, hkv=hkv, seed=hq + hkv, block_size=cfg.block_size))
    stats = matches_reference(q, k, v, cfg, dtype)
    if cfg.mode == "skip":
        assert (stats.stop_reason == STOP_EXHAUSTED).all()
    if cfg.mode == "skip" and cfg.skip_lambda == 1e-6:   # below every score gap here: nothing skipped
        assert stats.skipped_fraction == 0
    else:
        assert 0.1 < stats.skipped_fraction < 0.95
    if cfg.mode == "certified":
        assert (stats.stop_reason == STOP_CERTIFIED).any()


def test_box_and_ball_change_the_decisions_the_kernel_makes():
    """The ball is not a no-op on these inputs (so the comparison above covers it): it certifies earlier
    than the box alone, in the reference and the kernel alike."""
    q, k, v = structured(seed=7)
    lengths, _ = ragged(3, 700)
    box = ARTConfig(mode="certified", eps=1e-3, block_size=32)
    ball = box.with_overrides(score_bound="box+ball")
    _, box_stats = decode_attention_cpu(q, k, v, box, lengths=lengths)
    _, ball_stats = decode_attention_cpu(q, k, v, ball, lengths=lengths)
    same_decisions(ball_stats, reference(q, k, v, ball, lengths=lengths)[1])
    assert ball_stats.visited_blocks.sum() < box_stats.visited_blocks.sum()


@pytest.mark.parametrize("certificate,eps", [("relative", 1e-2), ("relative", 1e-3), ("absolute", 1e-2)])
@pytest.mark.parametrize("case", ["random", "structured", "needle", "heavy-values"])
@pytest.mark.parametrize("ball", [False, True], ids=["box", "box+ball"])
def test_value_aware_certificate_holds_in_the_kernel(case, certificate, eps, ball):
    q, k, v = {"random": lambda: inputs(t=700, d=64, seed=5), "structured": lambda: structured(seed=5),
               "needle": lambda: needle(seed=5), "heavy-values": lambda: heavy_values(seed=5)}[case]()
    lengths, valid = ragged(3, 700)
    cfg = ARTConfig(mode="certified", certificate=certificate, eps=eps, block_size=32,
                    score_bound="box+ball" if ball else "box")
    got, stats = decode_attention_cpu(q, k, v, cfg, lengths=lengths)
    want, ref = reference(q, k, v, cfg, lengths=lengths)
    same_decisions(stats, ref)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
    check_certificate(q, k, v, valid, got, cfg)
    if case != "random":
        assert stats.skipped_fraction > 0.05


@pytest.mark.parametrize("case,at", [("needle", 1), ("heavy-values", 5)])
@pytest.mark.parametrize("certificate,eps", [("relative", 1e-2), ("absolute", 1e-2)])
def test_value_aware_certificate_with_the_adversary_visited_last(case, at, certificate, eps):
    """A caller's order that puts the needle's block (or the heavy values' block) last: the certificate must
    not stop short of it unless it proves the output close, which the keys-only certificate does not."""
    q, k, v = needle(seed=9, at=at) if case == "needle" else heavy_values(seed=9, at=at)
    lengths, valid = ragged(3, 700)
    cfg = ARTConfig(mode="certified", certificate=certificate, eps=eps, block_size=32)
    walk = plan_walk(q, k, v, cfg, lengths=lengths)
    order = walk.order.clone()
    for b in range(3):   # move block `at` behind every other candidate block
        n = int(walk.cand[b, 0].sum())
        for h in range(2):
            rest = [j for j in order[b, h, :n].tolist() if j != at]
            order[b, h, :n] = torch.tensor(rest + [at])
    out, stats = decode_attention_cpu(q, k, v, cfg, lengths=lengths, order=order)
    check_certificate(q, k, v, valid, out, cfg)
    if case == "needle":   # the needle's own key bound keeps every walk going until it reaches it, last
        assert stats.visited_mask[..., at].all() and torch.equal(stats.visited_blocks, stats.candidate_blocks)
    else:                  # it may stop before the heavy block once its bound proves the output close
        assert (stats.stop_reason == STOP_CERTIFIED).any()
    mass_out, mass = decode_attention_cpu(q, k, v, cfg.with_overrides(certificate="mass"), lengths=lengths, order=order)
    assert mass.visited_blocks.sum() <= stats.visited_blocks.sum()


@pytest.mark.parametrize("cfg", [c for c in NEW_CONFIGS if c.mode != "stability"] +
                         [ARTConfig(mode="certified", eps=1e-2, block_size=32, certificate="relative",
                                    score_bound="box+ball")], ids=new_id)
def test_lean_decode_step_on_the_new_criteria(cfg):
    """The decoder layer's call: a padding mask and kept bounds of only the complete blocks."""
    q, k, v = structured(seed=11, block_size=cfg.block_size)
    _, valid = ragged(3, 700)
    want, ref = reference(q, k, v, cfg, key_padding_mask=valid)
    done = 700 // cfg.block_size
    kmin, kmax = block_key_bounds(k, torch.ones(3, 700, dtype=torch.bool), cfg.block_size)
    room = [torch.cat([x[:, :, :done], torch.full_like(x[:, :, :3], float("nan"))], 2) for x in (kmin, kmax)]
    out, visited, candidates = decode_step(q, k, v, cfg, 64 ** -0.5, key_padding_mask=valid,
                                           key_bounds=room if cfg.uses_bounds else None,
                                           bounds_done=done if cfg.uses_bounds else None)
    torch.testing.assert_close(out.transpose(1, 2), want, rtol=1e-4, atol=5e-5)
    assert (visited, candidates) == (int(ref.visited_blocks.sum()), int(ref.candidate_blocks.sum()))
    assert visited < candidates or (cfg.mode == "skip" and cfg.skip_lambda == 1e-6)


@pytest.mark.parametrize("cfg", [ARTConfig(mode="certified", eps=1e-2, block_size=32, certificate="relative",
                                           score_bound="box+ball"),
                                 ARTConfig(mode="skip", skip_lambda=1e-2, block_size=32, order="bound",
                                           score_bound="box+ball")], ids=new_id)
def test_quest_budget_and_kept_bounds_on_the_new_criteria(cfg):
    q, k, v = structured(seed=12)
    lengths, valid = ragged(3, 700)
    want, ref = reference(q, k, v, cfg, lengths=lengths, block_budget=12)
    kmin, kmax = block_key_bounds(k, valid, 32)
    room = [torch.cat([b, torch.full_like(b[:, :, :5], float("nan"))], 2) for b in (kmin, kmax)]
    got, stats = decode_attention_cpu(q, k, v, cfg, lengths=lengths, block_budget=12, key_bounds=room)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
    same_decisions(stats, ref)
    assert (stats.candidate_blocks == 12).all() and stats.skipped_fraction > 0


def test_dispatch_sends_the_new_criteria_to_the_kernel():
    cpu = torch.device("cpu")
    assert KERNEL_FEATURES["cpu"] == {"skip", "ball", "values"}
    for cfg in NEW_CONFIGS:
        assert features(cfg) <= KERNEL_FEATURES["cpu"]
        assert resolve("auto", cpu, cfg.block_size, cfg) == "cpu" and resolve("cpu", cpu, cfg.block_size, cfg) == "cpu"
    q, k, v = structured(seed=13)
    cfg = ARTConfig(mode="certified", eps=1e-2, block_size=32, certificate="relative", score_bound="box+ball")
    a, sa = decode_attention(q, k, v, cfg)
    b, sb = decode_attention(q, k, v, cfg, impl="reference")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)
    same_decisions(sa, sb)


def kept_balls(k, v, block_size, done):
    """Ball summaries of the first `done` blocks, each from its own keys/values with every position valid
    (as attention.cache keeps them)."""
    ones = torch.ones(k.shape[0], done * block_size, dtype=torch.bool)
    kc, kr = block_balls(k[:, :, : done * block_size], ones, block_size)
    vc, vr = block_balls(v[:, :, : done * block_size], ones, block_size)
    return kc, kr, vc, vr


BALL_CONFIGS = [c for c in NEW_CONFIGS if c.uses_ball or c.uses_values]


@pytest.mark.parametrize("cfg", BALL_CONFIGS, ids=new_id)
@pytest.mark.parametrize("masking", ["none", "ragged", "left-padded"])
@pytest.mark.parametrize("done", ["complete", "fewer"])
def test_kept_balls_give_what_balls_from_scratch_give(cfg, masking, done):
    """Kept balls of the first complete blocks, the rest summarised in the call (a kept block holding a
    masked position summarised again): the same summaries bit for bit, so the same decisions and outputs
    in the reference, the CPU kernel and its lean decoder-layer call."""
    q, k, v = structured(seed=21, t=701, block_size=cfg.block_size)
    bs = cfg.block_size
    valid = {"none": torch.ones(3, 701, dtype=torch.bool), "ragged": ragged(3, 701)[1],
             "left-padded": torch.arange(701)[None, :] >= torch.tensor([0, 40, 3 * bs + 5])[:, None]}[masking]
    n = 701 // bs if done == "complete" else 701 // bs - 3
    balls = kept_balls(k, v, bs, n)
    for x, kept in ((k, balls[:2]), (v, balls[2:])):
        got, want = complete_balls(x, valid, bs, kept), block_balls(x, valid, bs)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    mask = None if masking == "none" else valid
    want, ref = reference(q, k, v, cfg, key_padding_mask=mask)
    got, stats = reference(q, k, v, cfg, key_padding_mask=mask, balls=balls)
    assert torch.equal(got, want)
    same_decisions(stats, ref)
    want, ref = decode_attention_cpu(q, k, v, cfg, key_padding_mask=mask)
    got, stats = decode_attention_cpu(q, k, v, cfg, key_padding_mask=mask, balls=balls)
    assert torch.equal(got, want)
    same_decisions(stats, ref)
    plain = decode_step(q, k, v, cfg, 64 ** -0.5, key_padding_mask=mask)
    lean = decode_step(q, k, v, cfg, 64 ** -0.5, key_padding_mask=mask, balls=balls)
    assert torch.equal(lean[0], plain[0]) and lean[1:] == plain[1:]
    if cfg.uses_ball:   # only the key balls kept: the value balls computed in the call
        got, stats = decode_attention_cpu(q, k, v, cfg, key_padding_mask=mask, balls=(*balls[:2], None, None))
        assert torch.equal(got, want)
        same_decisions(stats, ref)


def test_kept_balls_are_checked():
    q, k, v = structured(seed=22)
    cfg = ARTConfig(mode="certified", eps=1e-2, block_size=32, certificate="relative", score_bound="box+ball")
    kc, kr, vc, vr = kept_balls(k, v, 32, 700 // 32)
    with pytest.raises(ValueError, match="kept balls"):
        decode_attention_cpu(q, k, v, cfg, balls=(kc[:, :1], kr[:, :1], vc, vr))
    with pytest.raises(ValueError, match="kept balls"):
        reference(q, k[:, :, :300], v[:, :, :300], cfg, balls=(kc, kr, vc, vr))

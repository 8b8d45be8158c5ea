"""The CPU ART kernel (attention/kernels/art_cpu.c) against the reference: same outputs, same decisions."""
import pytest
import torch

from attention import ARTConfig, decode_attention
from attention.kernels.cpu import decode_attention_cpu
from attention.kernels.dispatch import resolve
from attention.reference import STOP_STABLE, block_key_bounds
from attention.reference import decode_attention as reference

from tests.attention.test_reference import check_truncation, exact, inputs, ragged

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


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.mode}-{c.block_size}-{c.tau}-{c.order}")
@pytest.mark.parametrize("hq,hkv,peaked", [(8, 2, True), (4, 4, False), (9, 3, True), (9, 3, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_matches_reference(cfg, hq, hkv, peaked, dtype):
    q, k, v = (x.to(dtype) for x in inputs(hq=hq, hkv=hkv, t=700, d=64, peaked=peaked, seed=3))
    lengths, valid = ragged(3, 700)
    want, ref = reference(q, k, v, cfg, lengths=lengths)
    got, stats = decode_attention_cpu(q, k, v, cfg, lengths=lengths)
    same_decisions(stats, ref)
    tol = dict(rtol=1e-4, atol=5e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    if dtype == torch.float32:
        check_truncation(q, k, v, valid, got, stats, cfg.block_size)
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

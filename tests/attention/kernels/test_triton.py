"""The Triton ART kernel against the reference: compiled on a GPU where there is one, else on the CPU under
the Triton interpreter (tests/conftest.py)."""
import warnings
from unittest.mock import patch

import pytest
import torch

from attention import ARTConfig
from attention.reference import decode_attention
from attention.kernels import dispatch, triton_decode
from attention.kernels.dispatch import resolve
from attention.kernels.triton_decode import decode_attention_triton

from tests.attention.kernels.on_device import on_device
from tests.attention.test_reference import exact, inputs, ragged

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

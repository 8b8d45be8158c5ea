"""workers.serving.batch_attention: one packed step of decode rows (ragged, mixed ART settings) and a
prefill chunk through a tiny random Llama, against the same step with the reference kernel, and the
step's per-layer work watched for host-synchronising calls (the Triton path, compiled on a GPU where
there is one; the interpreter's own launch is outside the watch)."""
from __future__ import annotations

import pytest
import torch

from attention import ARTConfig
from attention.kernels import triton_decode
from tests.attention.kernels.on_device import DEVICE
from tests.attention.kernels.test_rows import Watch
from workers.data.assets import load_model
from workers.serving import batch_attention
from workers.serving.batch_attention import DecodeGroup, PrefillChunk, StepBatch
from workers.serving.kv_pool import KVPool

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 8
ARTS = [ARTConfig.preset("tuned", block_size=16), ARTConfig(mode="certified", eps=1e-3, block_size=16)]


@pytest.fixture(scope="module")
def model():
    model, _ = load_model("random:llama-tiny", task="causal_lm", dtype=torch.float32, max_position_embeddings=512)
    batch_attention.register()
    previous = model.config._attn_implementation
    model.config._attn_implementation = batch_attention.IMPLEMENTATION
    yield model.eval()
    model.config._attn_implementation = previous


def filled_pool(lengths: list[int], slots: int = 5, device=torch.device("cpu")) -> KVPool:
    pool = KVPool(LAYERS, KV_HEADS, HEAD_DIM, slots, 256, torch.float32, device)
    pool.track_blocks(16)
    gen = torch.Generator().manual_seed(0)
    for slot, n in enumerate(lengths):
        pool.load(slot, [(torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen),
                          torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen)) for _ in range(LAYERS)])
    return pool


def step(model, impl: str, watch: Watch | None = None):
    """Three decode rows (two ART groups, ragged) and a 20-token chunk at position 30 of slot 4; Triton's on
    its device (the logits and block counts come back on the CPU)."""
    dev = DEVICE if impl == "triton" else torch.device("cpu")
    lengths = [70, 33, 120]
    pool = filled_pool(lengths + [0, 30], device=dev)
    before = pool.lengths[:, :3].clone()
    groups = [DecodeGroup(ARTS[0], 0.0, [0, 2], torch.tensor([0, 2], device=dev)),
              DecodeGroup(ARTS[1], 0.0, [1], torch.tensor([1], device=dev))]
    plan = StepBatch(pool, [0, 1, 2], before, groups, [PrefillChunk(4, 30, 20, 3)], impl=impl)
    ids = torch.randint(10, 200, (1, 23), generator=torch.Generator().manual_seed(1)).to(dev)
    positions = torch.tensor([lengths + list(range(30, 50))], device=dev)
    model.to(dev)
    try:
        with torch.no_grad(), batch_attention.running(plan):
            if watch is None:
                logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
            else:
                with watch:
                    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    finally:
        model.to("cpu")
    plan.visited, plan.candidates = plan.visited.cpu(), plan.candidates.cpu()
    return logits[0].cpu(), plan


class LaunchAside(Watch):
    """The watch, blind while the Triton interpreter 'launches' (it copies to numpy: not what a GPU does)."""

    paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.paused:
            return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def test_a_packed_step_makes_no_host_synchronisation_per_layer(model, monkeypatch):
    watch, launches = LaunchAside(), []
    prepare = triton_decode.prepare_rows

    def prepare_then_launch_aside(*args, **kwargs):
        launch = prepare(*args, **kwargs)
        run = launch.run

        def unwatched():
            launches.append(1)
            watch.paused = True
            try:
                run()
            finally:
                watch.paused = False
        launch.run = unwatched
        return launch

    monkeypatch.setattr(triton_decode, "prepare_rows", prepare_then_launch_aside)
    got, plan = step(model, "triton", watch)
    seen = Watch()
    want, ref_plan = step(model, "reference", seen)
    assert "tolist" in seen.syncs   # the same watch does see the reference kernel's host reads
    assert len(launches) == LAYERS * len(ARTS)   # one kernel launch per layer and ART group
    assert watch.syncs == [], watch.syncs       # of SYNCING: item, tolist, __bool__, ...
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(plan.visited, ref_plan.visited) and torch.equal(plan.candidates, ref_plan.candidates)
    assert plan.layer_calls == LAYERS


def test_the_step_writes_the_pool_and_refreshes_completed_blocks(model):
    got, plan = step(model, "cpu")
    pool = plan.pool
    # the decode rows' new keys sit at their old lengths, the chunk's at positions 30..49 of slot 4
    for layer in range(LAYERS):
        assert pool.k[layer][0, :, 70].abs().sum() > 0 and pool.k[layer][4, :, 30:50].abs().sum(-1).all()
    # no completed blocks were named for this step, so slot 4's block 2 (positions 32..47) is not yet summarised
    kmin, _ = pool.key_bounds(0, 16)
    assert torch.equal(kmin[4, :, 2], torch.zeros_like(kmin[4, :, 2]))
    assert torch.isfinite(got).all() and got.shape == (23, model.config.vocab_size)
    # the counts: every candidate block of each row (blocks of 16 after the write), summed over layers and heads
    cands = [LAYERS * KV_HEADS * -(-(n + 1) // 16) for n in (70, 33, 120)]
    assert plan.candidates.tolist() == cands and (plan.visited <= plan.candidates).all()

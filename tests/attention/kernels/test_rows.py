"""`decode_rows` (decode attention over rows of a KV pool) in every implementation against its definition:
row i equals `attention.reference.decode_attention` over pool row rows[i], positions [starts[i], lengths[i]),
with that row's Quest budget. Triton runs compiled on a GPU where there is one, else under its interpreter
(tests/attention/kernels/on_device.py)."""
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from attention import ARTConfig
from attention.kernels import triton_decode
from attention.kernels.dispatch import decode_rows
from attention.reference import block_balls, block_key_bounds
from attention.reference import decode_attention as reference
from attention.reference import decode_rows as reference_rows
from tests.attention.kernels.on_device import DEVICE, moved, on_device

FP32 = dict(rtol=1e-4, atol=5e-5)
BF16 = dict(rtol=1e-2, atol=1e-2)


def pool_batch(hq=8, hkv=2, t=300, t_cap=384, d=32, slots=6, seed=0, window=False, dtype=torch.float32,
               graded=False):
    """A KV pool of `slots` rows (T_cap positions) and a decode batch over 4 of them, permuted:
    (q (4, hq, d), k, v (slots, hkv, t, d) non-contiguous views of the pool, rows, lengths, starts or None,
    the pool itself). Like trained LLMs, sinks and the newest keys dominate; positions past each row's
    length and unused rows hold NaN, so reading them would show. graded: milder sinks and newest keys, and
    keys clustered per 16 positions, each cluster with its own weight along the row's query direction
    (scores spread over ~8 nats), so that the bounds are informative and every criterion skips some
    blocks but not all (as `tests.attention.test_reference.structured`)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.tensor([4, 1, 5, 2])
    lengths = torch.tensor([t, t - 37, t // 2 + 5, 70])
    starts = torch.tensor([0, 50, 33, 0]) if window else None
    k_pool = 0.1 * torch.randn(slots, hkv, t_cap, d, generator=g)
    v_pool = torch.randn(slots, hkv, t_cap, d, generator=g)
    qg = torch.randn(slots, hkv, 1, d, generator=g)
    direction = qg / qg.norm(dim=-1, keepdim=True)
    sink, recent = (1.5, 1.0) if graded else (12.0, 6.0)
    k_pool[:, :, :4] += sink * math.sqrt(d) * direction
    q = torch.empty(4, hq, d)
    for i, (r, n) in enumerate(zip(rows.tolist(), lengths.tolist())):
        k_pool[r, :, n - 3: n] += recent * math.sqrt(d) * direction[r]
        noise = torch.randn(hkv, hq // hkv, d, generator=g)
        q[i] = (qg[r] + 0.3 * noise).reshape(hq, d)
    if graded:
        clusters = t_cap // 16
        level = torch.rand(slots, hkv, clusters, 1, generator=g)
        center = level * math.sqrt(d) * direction + 0.5 * torch.randn(slots, hkv, clusters, d, generator=g)
        k_pool += center.repeat_interleave(16, 2)
    kept_bounds = {bs: block_key_bounds(k_pool, torch.ones(slots, t_cap, dtype=torch.bool), bs)
                   for bs in (16, 24, 32, 48, 64)}   # what the pool keeps: every block it has written
    unused = torch.ones(slots, dtype=torch.bool)
    unused[rows] = False
    for x in (k_pool, v_pool):
        x[unused] = math.nan
        for r, n in zip(rows.tolist(), lengths.tolist()):
            x[r, :, n:] = math.nan
    k_pool, v_pool, q = k_pool.to(dtype), v_pool.to(dtype), q.to(dtype)
    k, v = k_pool[:, :, :t], v_pool[:, :, :t]
    assert not k.is_contiguous() and not v.is_contiguous()
    return q, k, v, rows, lengths, starts, kept_bounds


def pool_bounds(kept_bounds, block_size, rows, lengths):
    """The pool's (kmin, kmax) for `block_size`, stale (NaN) from each row's partial block on, as a pool
    that summarises only complete blocks holds them."""
    kmin, kmax = (x.clone() for x in kept_bounds[block_size])
    for r, n in zip(rows.tolist(), lengths.tolist()):
        kmin[r, :, n // block_size:] = math.nan
        kmax[r, :, n // block_size:] = math.nan
    return kmin, kmax


def assert_same_rows(got, want, tol):
    out, visited, candidates = got
    assert visited.dtype == candidates.dtype == torch.int64 and visited.shape == (out.shape[0],)
    assert torch.equal(visited, want[1]), (visited, want[1])
    assert torch.equal(candidates, want[2]), (candidates, want[2])
    torch.testing.assert_close(out.float(), want[0].float(), **tol)


def test_the_reference_is_decode_attention_per_row():
    """The oracle itself: whole-pool rows in order, no window, is the batched reference with lengths."""
    q, k, v, _, lengths, _, _ = pool_batch(seed=1)
    k, v = k[:4].nan_to_num(), v[:4].nan_to_num()   # rows 0..3, the batched reference reads all of k
    cfg = ARTConfig(tau=1e-3, phi=1e-2, patience=2, block_size=32)
    want, stats = reference(q[:, :, None], k, v, cfg, lengths=lengths)
    out, visited, candidates = reference_rows(q, k, v, cfg, lengths=lengths)
    torch.testing.assert_close(out, want.view_as(out), rtol=1e-5, atol=1e-6)
    assert torch.equal(visited, stats.visited_blocks.sum(-1))
    assert torch.equal(candidates, stats.candidate_blocks.sum(-1))
    assert (visited < candidates).any()   # it stopped somewhere: the comparison covers ART's decisions


CPU_CONFIGS = [ARTConfig(tau=1e-3, phi=1e-2, patience=2, block_size=32),
               # no recent block: the newest (partial) block is ranked by its bound like any other
               ARTConfig(tau=1e-2, phi=1e-2, patience=2, block_size=16, order="bound", recent_blocks=0),
               ARTConfig(mode="certified", eps=1e-3, block_size=32),
               ARTConfig(mode="certified", eps=1e-2, block_size=64, recent_blocks=2, min_blocks=1),
               ARTConfig(mode="off", block_size=32)]
SCENARIOS = {"ragged": dict(), "window": dict(window=True),
             "window-quest-bounds": dict(window=True, quest_ratio=0.5, bounds=True)}


def rows_with(impl, *args, **kwargs):
    """`decode_rows` with `impl`, Triton's on its device, the result on the CPU."""
    if impl == "triton":
        return on_device(decode_rows, *args, impl=impl, **kwargs)
    return decode_rows(*args, impl=impl, **kwargs)


def run_scenario(impl, cfg, scenario, hq, hkv, t, d, dtype, tol, graded=False):
    spec = SCENARIOS[scenario]
    q, k, v, rows, lengths, starts, kept = pool_batch(hq=hq, hkv=hkv, t=t, d=d, seed=hq + hkv,
                                                      window=spec.get("window", False), dtype=dtype, graded=graded)
    kwargs = dict(lengths=lengths, starts=starts, rows=rows, quest_ratio=spec.get("quest_ratio", 0.0))
    if spec.get("bounds"):
        kwargs["key_bounds"] = pool_bounds(kept, cfg.block_size, rows, lengths)
    want = decode_rows(q, k, v, cfg, impl="reference", **kwargs)
    got = rows_with(impl, q, k, v, cfg, **kwargs)
    assert_same_rows(got, want, tol)
    return got


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("cfg", CPU_CONFIGS, ids=lambda c: f"{c.mode}-{c.block_size}-{c.order}")
@pytest.mark.parametrize("hq,hkv", [(8, 2), (9, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_kernel_matches_the_definition(scenario, cfg, hq, hkv, dtype):
    tol = FP32 if dtype == torch.float32 else BF16
    _, visited, candidates = run_scenario("cpu", cfg, scenario, hq, hkv, 200, 64, dtype, tol)
    lengths, starts = torch.tensor([200, 163, 105, 70]), torch.tensor([0, 50, 33, 0])
    blocks = hkv * row_blocks(starts if "window" in scenario else None, lengths, cfg.block_size)
    if "quest" in scenario:   # each row keeps its own share of its own candidate blocks
        assert (candidates <= blocks).all() and (candidates < blocks).any()
    else:
        assert torch.equal(candidates, blocks)


# The skip comparator, box+ball bounds and the value-aware certificates (the CPU kernel; Triton's own
# tests are in test_triton.py). On graded pools, where each of them skips some blocks but not all.
NEW_CONFIGS = [ARTConfig(mode="skip", skip_lambda=1e-3, block_size=32),
               ARTConfig(mode="skip", skip_lambda=1.0, block_size=16, order="bound", score_bound="box+ball",
                         recent_blocks=0),
               ARTConfig(mode="certified", eps=1e-3, block_size=32, score_bound="box+ball"),
               ARTConfig(mode="certified", eps=1e-2, block_size=32, certificate="relative"),
               ARTConfig(mode="certified", eps=1e-2, block_size=16, certificate="absolute", score_bound="box+ball",
                         recent_blocks=2, min_blocks=1),
               ARTConfig(tau=1e-2, phi=1e-2, patience=2, block_size=16, order="bound", score_bound="box+ball")]


def new_id(c):
    return f"{c.mode}-{c.certificate if c.mode == 'certified' else c.skip_lambda}-{c.score_bound}-{c.block_size}"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("cfg", NEW_CONFIGS, ids=new_id)
@pytest.mark.parametrize("hq,hkv", [(8, 2), (9, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_kernel_matches_the_definition_on_the_new_criteria(scenario, cfg, hq, hkv, dtype):
    tol = FP32 if dtype == torch.float32 else BF16
    _, visited, candidates = run_scenario("cpu", cfg, scenario, hq, hkv, 200, 64, dtype, tol, graded=True)
    assert visited.sum() > hkv * 4   # more than the sink blocks
    if "quest" not in scenario:      # (Quest's budget alone may leave nothing more to skip)
        assert (visited < candidates).any()


@pytest.mark.parametrize("cfg", NEW_CONFIGS[:5], ids=new_id)
def test_the_new_criteria_skip_what_they_skip_in_the_reference(cfg):
    """The oracle on graded pools: the rows' decisions are real (some blocks skipped, not all)."""
    q, k, v, rows, lengths, starts, _ = pool_batch(t=200, d=64, window=True, graded=True)
    _, visited, candidates = reference_rows(q, k, v, cfg, lengths=lengths, starts=starts, rows=rows)
    assert 0.05 < 1 - visited.sum() / candidates.sum() < 0.9


TRITON_CONFIGS = [ARTConfig(tau=1e-3, phi=1e-2, patience=2, block_size=16),
                  ARTConfig(tau=1e-2, phi=1e-2, patience=2, block_size=24, order="bound", recent_blocks=0),
                  ARTConfig(mode="certified", eps=1e-3, block_size=32),
                  ARTConfig(mode="certified", eps=1e-2, block_size=48, min_blocks=1),
                  ARTConfig(mode="off", block_size=64)]


@pytest.mark.parametrize("scenario", ["ragged", "window-quest-bounds"])
@pytest.mark.parametrize("cfg", TRITON_CONFIGS, ids=lambda c: f"{c.mode}-{c.block_size}-{c.order}")
@pytest.mark.parametrize("hq,hkv", [(8, 2), (9, 3)])
def test_triton_kernel_matches_the_definition(scenario, cfg, hq, hkv):
    run_scenario("triton", cfg, scenario, hq, hkv, 160, 32, torch.float32, FP32)


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_art_stops_early_on_peaked_rows(impl):
    """The decisions compared above include real early stops (not only walks of every block)."""
    cfg = ARTConfig(tau=1e-3, phi=1e-2, patience=2, block_size=16)
    _, visited, candidates = run_scenario(impl, cfg, "window", 8, 2, 200, 32, torch.float32, FP32)
    assert (visited < candidates).sum() >= 2


@pytest.mark.parametrize("max_chunk", [16, 32])
def test_triton_walks_big_blocks_in_chunks(max_chunk):
    """Blocks wider than a chunk (48 = 3 x 16, or 2 x 32 with the second half masked) give the same result."""
    q, k, v, rows, lengths, starts, kept = pool_batch(hq=9, hkv=3, t=160, seed=7, window=True)
    cfg = ARTConfig(mode="certified", eps=1e-3, block_size=48, min_blocks=1)
    kwargs = dict(lengths=lengths, starts=starts, rows=rows, key_bounds=pool_bounds(kept, 48, rows, lengths))
    want = reference_rows(q, k, v, cfg, **kwargs)
    got = on_device(triton_decode.decode_rows_triton, q, k, v, cfg, max_chunk=max_chunk, **kwargs)
    assert_same_rows(got, want, FP32)


@pytest.mark.parametrize("impl", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("cfg", [ARTConfig(mode="certified", eps=1e-3, block_size=32, recent_blocks=0),
                                 ARTConfig(tau=1e-2, phi=1e-2, patience=2, block_size=16, order="bound")],
                         ids=lambda c: c.mode)
def test_kept_bounds_give_the_same_decisions_as_bounds_from_the_keys(impl, cfg):
    """Without a window the pool's summaries of complete blocks are exactly what the keys give."""
    q, k, v, rows, lengths, _, kept = pool_batch(t=160, seed=3)
    common = dict(lengths=lengths, rows=rows, quest_ratio=0.3)
    with_kept = rows_with(impl, q, k, v, cfg, key_bounds=pool_bounds(kept, cfg.block_size, rows, lengths), **common)
    from_keys = rows_with(impl, q, k, v, cfg, **common)
    assert_same_rows(with_kept, from_keys, FP32)
    if impl != "reference":   # Quest with bounds from the keys, against the definition
        assert_same_rows(from_keys, reference_rows(q, k, v, cfg, **common), FP32)


def pool_balls(k, v, block_size, rows, lengths):
    """What a pool keeps with `track_blocks(block_size, balls=True)`: (key centres, key radii, value centres,
    value radii) of every complete block, each from its own vectors (`block_balls`, every position valid),
    stale (NaN) from each row's partial block on."""
    every = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool)
    full = k.shape[2] // block_size
    kept = [x[:, :, :full].clone() for kv in (k, v) for x in block_balls(kv, every, block_size)]
    for r, n in zip(rows.tolist(), lengths.tolist()):
        for x in kept:
            x[r, :, n // block_size:] = math.nan
    return tuple(kept)


BALL_CONFIGS = NEW_CONFIGS[2:]   # those that read key or value balls


@pytest.mark.parametrize("impl", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("window", [False, True], ids=["ragged", "window"])
@pytest.mark.parametrize("cfg", BALL_CONFIGS, ids=new_id)
def test_kept_balls_give_the_same_decisions_as_balls_from_the_keys(impl, window, cfg):
    """The pool's balls of complete blocks (stale past each row's length; a window's first block and the
    partial newest one summarised from the keys) decide exactly what balls made from the rows decide."""
    assert cfg.uses_ball or cfg.uses_values
    q, k, v, rows, lengths, starts, kept = pool_batch(t=230, d=64, seed=5, window=window, graded=True)
    common = dict(lengths=lengths, starts=starts, rows=rows, key_bounds=pool_bounds(kept, cfg.block_size, rows, lengths))
    balls = pool_balls(k, v, cfg.block_size, rows, lengths)
    with_kept = rows_with(impl, q, k, v, cfg, balls=balls, **common)
    from_keys = reference_rows(q, k, v, cfg, **common)
    assert_same_rows(with_kept, from_keys, FP32)
    assert (with_kept[1] < with_kept[2]).any()   # something was skipped: the summaries decided it


def test_kept_balls_read_two_blocks_per_row():
    """With the pool's balls, a call reads each row's first and last block, not its whole row."""
    q, k, v, rows, lengths, starts, kept = pool_batch(t=400, t_cap=448, slots=40, window=True, graded=True)
    cfg = BALL_CONFIGS[-2]   # key and value balls
    bs, hkv, d = cfg.block_size, k.shape[1], k.shape[3]
    kwargs = dict(lengths=lengths, starts=starts, rows=rows, key_bounds=pool_bounds(kept, bs, rows, lengths))
    balls = pool_balls(k, v, bs, rows, lengths)
    with Watch() as watch:
        got = decode_rows(q, k, v, cfg, impl="cpu", balls=balls, **kwargs)
    assert 0 < watch.largest <= 2 * len(rows) * bs * hkv * d < len(rows) * k[0].numel() / 3
    assert_same_rows(got, reference_rows(q, k, v, cfg, **kwargs), FP32)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_bad_kept_balls_are_refused(impl):
    q, k, v, rows, lengths, _, _ = pool_batch(t=100)
    cfg = BALL_CONFIGS[1]
    balls = pool_balls(k, v, cfg.block_size, rows, lengths)
    with pytest.raises(ValueError, match=r"balls\[1\] must be \(6, 2, >= 3\)"):
        decode_rows(q, k, v, cfg, lengths=lengths, rows=rows, impl=impl,
                    balls=(balls[0], balls[1][:, :, :2], *balls[2:]))
    with pytest.raises(ValueError, match="balls must be"):
        decode_rows(q, k, v, cfg, lengths=lengths, rows=rows, impl=impl, balls=balls[:2])


def row_blocks(starts, lengths, block_size):
    """(b,) blocks holding valid positions of each row."""
    starts = torch.zeros_like(lengths) if starts is None else starts
    return (lengths - 1) // block_size - starts // block_size + 1


def test_mode_off_walks_every_candidate_block_of_each_row():
    q, k, v, rows, lengths, starts, _ = pool_batch(t=200, window=True)   # lengths 200, 163, 105, 70
    cfg = ARTConfig(mode="off", block_size=16)
    blocks = row_blocks(starts, lengths, 16)
    assert blocks.tolist() == [13, 8, 5, 5]
    # Quest at 0.5: max(1, ceil(n / 2)) = 7, 4, 3, 3 blocks, never fewer than the protected ones (the
    # sink block where the window reaches it, and the newest): 2, 1, 1, 2
    kept = torch.tensor([7, 4, 3, 3])
    for impl in ("reference", "cpu", "triton"):
        _, visited, candidates = rows_with(impl, q, k, v, cfg, lengths=lengths, starts=starts, rows=rows)
        assert torch.equal(visited, 2 * blocks) and torch.equal(candidates, 2 * blocks)
        _, visited, candidates = rows_with(impl, q, k, v, cfg, lengths=lengths, starts=starts, rows=rows,
                                           quest_ratio=0.5)
        assert torch.equal(visited, 2 * kept) and torch.equal(candidates, 2 * kept)


def test_rows_default_to_the_batch_order():
    q, k, v, rows, lengths, _, _ = pool_batch(t=200)
    cfg = ARTConfig(tau=1e-3, phi=1e-2, patience=2, block_size=32)
    want = decode_rows(q, k, v, cfg, lengths=lengths, rows=rows, impl="reference")
    k_batch, v_batch = k[rows], v[rows]   # the same rows gathered into batch order
    for impl in ("cpu", "triton"):
        assert_same_rows(rows_with(impl, q, k_batch, v_batch, cfg, lengths=lengths), want, FP32)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_bad_row_values_are_refused(impl):
    q, k, v, rows, lengths, _, _ = pool_batch(t=200)
    cfg = ARTConfig(block_size=32)
    with pytest.raises(ValueError, match="rows must be pool rows"):
        decode_rows(q, k, v, cfg, lengths=lengths, rows=torch.tensor([0, 1, 6, 2]), impl=impl)
    with pytest.raises(ValueError, match="lengths must be in"):
        decode_rows(q, k, v, cfg, lengths=torch.tensor([201, 5, 5, 5]), rows=rows, impl=impl)
    with pytest.raises(ValueError, match="starts must be in"):
        decode_rows(q, k, v, cfg, lengths=lengths, starts=torch.tensor([0, 163, 0, 0]), rows=rows, impl=impl)
    with pytest.raises(ValueError, match="quest_ratio must be in"):
        decode_rows(q, k, v, cfg, lengths=lengths, rows=rows, quest_ratio=1.0, impl=impl)
    with pytest.raises(ValueError, match="key_bounds must be"):
        decode_rows(q, k, v, cfg, lengths=lengths, rows=rows, key_bounds=(torch.zeros(6, 2, 3, 32),) * 2, impl=impl)
    with pytest.raises(ValueError, match="key_bounds must be on k's device"):   # a pool's bounds left behind
        decode_rows(q, k, v, cfg, lengths=lengths, rows=rows, impl=impl,
                    key_bounds=(torch.zeros(6, 2, 7, 32, device="meta"),) * 2)


# ---- no host synchronisation, no work proportional to the pool -------------------------------------------

SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
           "masked_select", "unique", "argwhere"}


class Watch(TorchFunctionMode):
    """Records tensor calls that make the host wait for the device, and the largest tensor allocated
    (views of existing tensors allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.syncs, self.largest = [], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNCING:
            self.syncs.append(name)
        result = func(*args, **(kwargs or {}))
        for x in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(x, torch.Tensor) and x._base is None:
                self.largest = max(self.largest, x.numel())
        return result


def test_the_watch_sees_a_synchronising_call():
    q, k, v, rows, lengths, _, _ = pool_batch(t=100)
    with Watch() as watch:
        reference_rows(q, k, v, ARTConfig(block_size=32), lengths=lengths, rows=rows)
    assert "tolist" in watch.syncs


@pytest.mark.parametrize("cfg,quest,bounds", [
    (ARTConfig(mode="certified", eps=1e-3, block_size=24), 0.4, True),
    (ARTConfig(tau=1e-2, phi=1e-2, patience=2, block_size=16, order="bound"), 0.0, False),
    (ARTConfig(mode="off", block_size=32), 0.3, True),
    (ARTConfig(tau=1e-3, phi=1e-2, patience=2, block_size=32), 0.0, False)], ids=["certified", "bound", "off", "recency"])
def test_triton_planning_makes_no_host_synchronisation(cfg, quest, bounds):
    q, k, v, rows, lengths, starts, kept = pool_batch(t=200, window=True)
    kwargs = dict(lengths=lengths, starts=starts, rows=rows, quest_ratio=quest,
                  key_bounds=pool_bounds(kept, cfg.block_size, rows, lengths) if bounds else None)
    args, on = moved((q, k, v), DEVICE), moved(kwargs, DEVICE)
    with Watch() as watch:
        launch = triton_decode.prepare_rows(*args, cfg, **on)
    launch.run()   # the interpreter's launch copies to numpy: outside the watch
    with Watch() as finish:
        got = triton_decode.finish_rows(launch, args[0])
    assert watch.syncs == [] and finish.syncs == []
    assert_same_rows(moved(got, "cpu"), reference_rows(q, k, v, cfg, **kwargs), FP32)


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_the_pool_is_never_copied(impl):
    """With the pool's bounds, a call makes nothing the size of the pool (only per-row tensors)."""
    q, k, v, rows, lengths, starts, kept = pool_batch(t=200, slots=40, window=True)
    cfg = ARTConfig(mode="certified", eps=1e-3, block_size=32)
    kwargs = dict(lengths=lengths, starts=starts, rows=rows, quest_ratio=0.3,
                  key_bounds=pool_bounds(kept, 32, rows, lengths))
    device = DEVICE if impl == "triton" else torch.device("cpu")
    args, on = moved((q, k, v), device), moved(kwargs, device)
    with Watch() as watch:
        if impl == "cpu":
            got = decode_rows(*args, cfg, impl="cpu", **on)
        else:
            launch = triton_decode.prepare_rows(*args, cfg, **on)
    if impl == "triton":
        launch.run()
        got = moved(triton_decode.finish_rows(launch, args[0]), "cpu")
    assert 0 < watch.largest < k[0].numel()   # less than one pool row, let alone all 40
    assert_same_rows(got, reference_rows(q, k, v, cfg, **kwargs), FP32)


def test_the_new_criteria_read_the_batch_rows_never_the_pool():
    """The summaries of box+ball bounds and the value-aware certificate come from the batch's rows only
    (gathered, as `attention.reference.rows_summaries` does), a few rows' worth, never the 40-row pool."""
    q, k, v, rows, lengths, starts, kept = pool_batch(t=200, slots=40, window=True, graded=True)
    cfg = ARTConfig(mode="certified", eps=1e-2, block_size=32, certificate="relative", score_bound="box+ball")
    kwargs = dict(lengths=lengths, starts=starts, rows=rows, quest_ratio=0.3,
                  key_bounds=pool_bounds(kept, 32, rows, lengths))
    with Watch() as watch:
        got = decode_rows(q, k, v, cfg, impl="cpu", **kwargs)
    assert 0 < watch.largest <= 2 * len(rows) * k[0].numel() < k.numel() / 4
    assert_same_rows(got, reference_rows(q, k, v, cfg, **kwargs), FP32)

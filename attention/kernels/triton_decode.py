"""Triton ART decode kernel: split-KV, fp32 online-softmax state, the ART check inside the block loop.

Two entry points over the same kernel:
- `decode_attention_triton`: `attention.reference.decode_attention`'s signature and semantics (its oracle);
  the host plans the walk with the reference's `plan_walk`.
- `decode_rows_triton`: the serving engine's call over rows of a preallocated KV pool (see
  `attention.kernels.dispatch.decode_rows`); the walk is planned by `plan_rows` in torch ops on the device,
  so the whole call never makes the host wait for the GPU.

Each program walks one (sequence, KV head, split) over its share of the visiting order with all query
heads of the GQA group, stopping on its own. With one split the kernel makes exactly the reference's
decisions; with several, each split stops on its own and writes a valid partial (m, l, acc) that the
combine step merges exactly for what was visited. k and v are read through their strides (pool views are
never copied). Any block size works: a block is walked in power-of-two chunks of at most MAX_CHUNK
positions (at least 16, as tl.dot needs), the positions past the block masked.

The criteria (MODE): stability, certified (CERT: the mass certificate or the value-aware one, relative or
absolute; what the unvisited blocks can still add is read from per-position suffix tables made on the
device before the launch, `certificate_tables`, so each block's check costs O(group) rather than
O(blocks)), skip (every candidate block's keys are scored; its values are read only if some query head's
max score reaches m + skip_log: a block of one chunk is scored once, a block of several chunks is scored in
a first pass over its keys and, if taken, walked again with its values). box+ball score bounds only change
the bounds the planning gives. Tested on CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attention.config import ARTConfig
from attention.reference import (STOP_CERTIFIED, STOP_EXHAUSTED, STOP_STABLE, ARTStats, ball_bounds,
                                 block_key_bounds, check_rows, check_shapes, dense_result, plan_walk,
                                 rows_summaries, upper_bounds, visiting_order)

try:
    import triton
    import triton.language as tl
except ImportError:   # the reference still works; `decode_attention_triton` says what is missing
    triton = None

MAX_CHUNK = 64   # positions of a block loaded at once: bigger blocks are walked in several chunks
MODE_CODES = {"off": 0, "walk": 0, "stability": 1, "certified": 2, "skip": 3}   # the kernel's MODE: 0 walks every candidate
CERT_CODES = {"mass": 0, "relative": 1, "absolute": 2}   # certified mode's CERT


if triton is not None:

    @triton.jit
    def _chunk_live(valid_ptr, b, T, blk, c, row_start, row_end, offs_c,
                    BS: tl.constexpr, CHUNK: tl.constexpr, HAS_VALID: tl.constexpr):
        """Chunk c of block blk: its positions and which of them are valid."""
        in_blk = c * CHUNK + offs_c
        pos = blk * BS + in_blk
        live = (in_blk < BS) & (pos >= row_start) & (pos < row_end)
        if HAS_VALID:
            live = live & (tl.load(valid_ptr + b * T + pos, mask=live, other=0) != 0)
        return pos, live

    @triton.jit
    def _chunk_rows(ptr, pos, live, offs_d, dmask, stride):
        """The chunk's (CHUNK, D_PAD) keys or values in fp32, zeros off the valid positions."""
        return tl.load(ptr + pos[:, None] * stride + offs_d[None, :],
                       mask=live[:, None] & dmask[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _chunk_scores(q, kb, live):
        """(G_PAD, CHUNK) scores, -inf off the valid positions."""
        s = tl.dot(q, tl.trans(kb), input_precision="ieee")
        return tl.where(live[None, :], s, float("-inf"))

    @triton.jit
    def _chunk_update(m, l, acc, s, vb):
        """The online softmax over one chunk's scores s and values vb."""
        m_new = tl.maximum(m, tl.max(s, 1))
        # a chunk with no valid position before any valid one leaves m at -inf: no NaN from inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, vb, input_precision="ieee")
        return m_new, l, acc

    @triton.jit
    def _art_decode_kernel(
        q_ptr, k_ptr, v_ptr, rows_ptr, start_ptr, end_ptr, valid_ptr, order_ptr, need_ptr, ncand_ptr,
        skip_ptr, ctop_ptr, csum_ptr, cwsum_ptr, cspread_ptr, cmean_ptr,
        m_out, l_out, acc_out, visited_out, reason_out, vmask_out,
        T, NB, G, D, blocks_per_split, scale, tau, phi, eps,
        sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
        HKV: tl.constexpr, SPLITS: tl.constexpr, BS: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
        G_PAD: tl.constexpr, D_PAD: tl.constexpr, MODE: tl.constexpr, CERT: tl.constexpr,
        PATIENCE: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_VALID: tl.constexpr, STORE_MASK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = pid % SPLITS
        bh = pid // SPLITS
        b = bh // HKV
        h = bh % HKV
        if HAS_ROWS:   # the pool row this batch entry reads
            r = tl.load(rows_ptr + b).to(tl.int64)
        else:
            r = b.to(tl.int64)
        row_start = tl.load(start_ptr + b)   # valid positions [row_start, row_end)
        row_end = tl.load(end_ptr + b)
        k_row = k_ptr + r * sk_b + h * sk_h   # int64 offsets: a pool may exceed 2**31 elements
        v_row = v_ptr + r * sv_b + h * sv_h
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_c = tl.arange(0, CHUNK)
        gmask = offs_g < G
        dmask = offs_d < D
        q = tl.load(q_ptr + b * sq_b + (h * G + offs_g)[:, None] * sq_h + offs_d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * scale
        m = tl.full((G_PAD,), float("-inf"), tl.float32)
        l = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D_PAD), tl.float32)
        o_prev = tl.zeros((G_PAD, D_PAD), tl.float32)
        need = tl.load(need_ptr + bh)
        n_cand = tl.load(ncand_ptr + bh)
        start = split * blocks_per_split
        end = tl.minimum(start + blocks_per_split, n_cand)   # candidates come first in the order
        if MODE == 3:   # skip: ln(skip_lambda / context) of this sequence
            skip_log = tl.load(skip_ptr + b)
        if MODE == 2:
            if CERT != 0:   # value-aware certificate: the point C of this (sequence, KV head)
                c_mean = tl.load(cmean_ptr + bh * D + offs_d, mask=dmask, other=0.0)
        j = start
        run = start * 0      # int32 scalars (loop-carried types must not change)
        reason = start * 0
        nvis = start * 0     # blocks whose values were read (all walked ones, except skipped in skip mode)
        while (j < end) & (reason == 0):
            blk = tl.load(order_ptr + bh * NB + j)
            if MODE == 3:
                if N_CHUNKS == 1:   # one chunk: score it, then read the values only if some score may count
                    pos, live = _chunk_live(valid_ptr, b, T, blk, 0, row_start, row_end, offs_c, BS, CHUNK, HAS_VALID)
                    s = _chunk_scores(q, _chunk_rows(k_row, pos, live, offs_d, dmask, sk_t), live)
                    # faint where every score is below m + skip_log (written as the reference's test: NaN is not faint)
                    count = tl.where((tl.max(s, 1) - m < skip_log) | (offs_g >= G), 0, 1)
                    if tl.sum(count, 0) > 0:
                        m, l, acc = _chunk_update(m, l, acc, s, _chunk_rows(v_row, pos, live, offs_d, dmask, sv_t))
                        nvis += 1
                        if STORE_MASK:
                            tl.store(vmask_out + bh * NB + blk, 1)
                else:   # several chunks: a first pass over the keys for the block's max, then the update
                    bmax = tl.full((G_PAD,), float("-inf"), tl.float32)
                    for c in range(N_CHUNKS):
                        pos, live = _chunk_live(valid_ptr, b, T, blk, c, row_start, row_end, offs_c, BS, CHUNK,
                                                HAS_VALID)
                        s = _chunk_scores(q, _chunk_rows(k_row, pos, live, offs_d, dmask, sk_t), live)
                        bmax = tl.maximum(bmax, tl.max(s, 1))
                    count = tl.where((bmax - m < skip_log) | (offs_g >= G), 0, 1)
                    if tl.sum(count, 0) > 0:
                        for c in range(N_CHUNKS):   # the keys again (cached), now with the values
                            pos, live = _chunk_live(valid_ptr, b, T, blk, c, row_start, row_end, offs_c, BS, CHUNK,
                                                    HAS_VALID)
                            kb = _chunk_rows(k_row, pos, live, offs_d, dmask, sk_t)
                            vb = _chunk_rows(v_row, pos, live, offs_d, dmask, sv_t)
                            m, l, acc = _chunk_update(m, l, acc, _chunk_scores(q, kb, live), vb)
                        nvis += 1
                        if STORE_MASK:
                            tl.store(vmask_out + bh * NB + blk, 1)
            else:
                for c in range(N_CHUNKS):   # the block in chunks; the online softmax runs on across them
                    pos, live = _chunk_live(valid_ptr, b, T, blk, c, row_start, row_end, offs_c, BS, CHUNK, HAS_VALID)
                    kb = _chunk_rows(k_row, pos, live, offs_d, dmask, sk_t)
                    vb = _chunk_rows(v_row, pos, live, offs_d, dmask, sv_t)
                    m, l, acc = _chunk_update(m, l, acc, _chunk_scores(q, kb, live), vb)
                nvis += 1
                if STORE_MASK:
                    tl.store(vmask_out + bh * NB + blk, 1)
            j += 1
            visited = j - start
            may_stop = (visited >= need - start) & (j < n_cand)
            if MODE == 1:   # stability: magnitude and direction change of the running output
                o = acc / l[:, None]
                on = tl.sqrt(tl.sum(o * o, 1))
                pn = tl.sqrt(tl.sum(o_prev * o_prev, 1))
                d_mag = tl.sqrt(tl.sum((o - o_prev) * (o - o_prev), 1)) / tl.maximum(pn, 1e-30)
                d_dir = 1.0 - tl.sum(o * o_prev, 1) / (tl.maximum(on, 1e-30) * tl.maximum(pn, 1e-30))
                bad = ((d_mag >= tau) | (d_dir >= phi)) & gmask
                stable = tl.sum(bad.to(tl.int32), 0) == 0
                checked = j > need
                run = tl.where(checked, tl.where(stable, run + 1, 0), run)
                if may_stop & checked & (run >= PATIENCE):
                    reason = 1
                o_prev = o
            elif MODE == 2:   # certified: the unvisited blocks (order positions j.. n_cand) from suffix tables
                here = gmask & (j + 0 * offs_g < n_cand)   # (the interpreter cannot mask with tensor & scalar)
                row = (bh * G_PAD + offs_g) * NB + j
                top = tl.load(ctop_ptr + row, mask=here, other=float("-inf"))   # max ub over the suffix
                lift = tl.exp(top - m)
                rest = tl.load(csum_ptr + row, mask=here, other=0.0) * lift    # sum n exp(ub - m)
                if CERT == 0:   # mass: R / (l + R) <= eps
                    ok = rest / (l + rest) <= eps
                else:           # value-aware: min(A, B) <= eps ||o|| (relative) or eps (absolute)
                    weighted = tl.load(cwsum_ptr + row, mask=here, other=0.0) * lift
                    top_spread = tl.load(cspread_ptr + bh * NB + j, mask=j < n_cand, other=0.0)
                    o = acc / l[:, None]
                    diff = tl.where(dmask[None, :], o - c_mean[None, :], 0.0)
                    to_mean = tl.sqrt(tl.sum(diff * diff, 1))
                    err = tl.minimum(rest / (l + rest) * (to_mean + top_spread), (to_mean * rest + weighted) / l)
                    if CERT == 1:
                        ok = err <= eps * tl.sqrt(tl.sum(o * o, 1))
                    else:
                        ok = err <= eps
                bad = tl.where(ok | (offs_g >= G), 0, 1)
                if may_stop & (tl.sum(bad, 0) == 0):
                    reason = 2
        out_row = pid
        tl.store(m_out + out_row * G_PAD + offs_g, m)
        tl.store(l_out + out_row * G_PAD + offs_g, l)
        tl.store(acc_out + (out_row * G_PAD + offs_g)[:, None] * D_PAD + offs_d[None, :], acc)
        tl.store(visited_out + out_row, nvis)
        tl.store(reason_out + out_row, reason)


def _next_pow2(x: int, at_least: int = 16) -> int:
    return max(at_least, 1 << (max(x, 1) - 1).bit_length())


def _chunking(block_size: int, max_chunk: int | None = None) -> dict:
    """The kernel's BS, CHUNK and N_CHUNKS for a block size: power-of-two chunks (>= 16, <= max_chunk,
    default MAX_CHUNK)."""
    chunk = min(_next_pow2(block_size), max(16, MAX_CHUNK if max_chunk is None else max_chunk))
    return dict(BS=block_size, CHUNK=chunk, N_CHUNKS=-(-block_size // chunk))


def _need_triton() -> None:
    if triton is None:
        raise ImportError("the Triton kernel needs `triton` (pip install triton); use "
                          "attention.reference.decode_attention otherwise")


@dataclass
class _Launch:
    """One kernel launch: grid, arguments, compile-time constants, and the outputs it fills."""

    grid: tuple[int]
    args: tuple
    meta: dict
    m: torch.Tensor            # (programs, g_pad) running max
    l: torch.Tensor            # (programs, g_pad) normaliser
    acc: torch.Tensor          # (programs, g_pad, d_pad) accumulator
    visited: torch.Tensor      # (programs,) int32 blocks visited
    reason: torch.Tensor       # (programs,) int32 stop reason
    vmask: torch.Tensor        # (b * hkv, nb) int8 visited blocks (when meta STORE_MASK)
    n_cand: torch.Tensor       # (b, hkv) int32 candidate blocks

    def run(self) -> None:
        _art_decode_kernel[self.grid](*self.args, **self.meta)


def _suffix_max(x: torch.Tensor) -> torch.Tensor:
    """y[..., j] = max(x[..., j:])."""
    return x.flip(-1).cummax(-1).values.flip(-1)


def certificate_tables(ub: torch.Tensor, order: torch.Tensor, n_valid: torch.Tensor, n_cand: torch.Tensor,
                       spread: torch.Tensor | None = None):
    """What certified mode needs of the blocks not yet visited, per position j of the visiting order: the
    candidates at order positions j .. n_cand - 1 (a walk that has visited j blocks). Per (b, hkv, query
    head, j), fp32: top = max ub over them (-inf when none) and sums = sum n exp(ub - top) (0 when none), so
    the kernel's R = sum n exp(ub - m) is exp(top - m) sums, one load per head and block instead of a sum
    over every block at every block. With `spread` (b, hkv, nb) (value-aware certificate) also wsums =
    sum n s exp(ub - top) (b, hkv, g, nb) and top_spread = max s over them (b, hkv, nb), 0 when none.
    Suffix sums are exact sums of positive terms (fp64 log-sum-exp, then fp32), never a running total
    with visited blocks subtracted (that cancels catastrophically: the block just visited is the largest
    term). ub (b, hkv, g, nb) by block index; torch ops only, no read-back."""
    b, hkv, g, nb = ub.shape
    live = torch.arange(nb, device=ub.device) < n_cand[..., None]                  # (b, hkv, nb) by position
    u = ub.float().gather(-1, order[:, :, None, :].expand(b, hkv, g, nb))
    u = u.masked_fill(~live[:, :, None, :], -math.inf)
    top = _suffix_max(u)
    finite = torch.isfinite(top)
    shift = torch.where(finite, top, torch.zeros_like(top)).double()
    logw = u.double() + n_valid[:, None, :].expand(b, hkv, nb).gather(-1, order).double().log()[:, :, None, :]

    def suffix_sum(log_terms):
        lse = log_terms.flip(-1).logcumsumexp(-1).flip(-1)
        return torch.where(finite, torch.exp(lse - shift), torch.zeros_like(shift)).float().contiguous()

    sums = suffix_sum(logw)
    if spread is None:
        return top.contiguous(), sums, None, None
    s = spread.float().gather(-1, order).masked_fill(~live, 0.0)
    wsums = suffix_sum(logw + s.double().log()[:, :, None, :])
    return top.contiguous(), sums, wsums, _suffix_max(s).contiguous()


def _launch(q3, k, v, cfg: ARTConfig, mode: int, *, rows, starts, ends, valid, order, n_valid, ub, need, n_cand,
            t: int, scale: float, splits: int = 1, store_mask: bool = False, max_chunk: int | None = None,
            skip_log=None, mean=None, spread=None) -> _Launch:
    """The launch for q3 (b, hq, d) contiguous against k, v (rows, hkv, T, d) read through their strides;
    the plan tensors as `plan_walk` / `plan_rows` make them (ub (b, hkv, g, nb), read in certified mode only;
    skip_log (b,) in skip mode; mean, spread with the value-aware certificate). Allocation and torch ops
    only: nothing is read back."""
    b, hq, d = q3.shape
    hkv = k.shape[1]
    g, nb = hq // hkv, order.shape[-1]
    g_pad, d_pad = _next_pow2(g), _next_pow2(d)
    per_split = math.ceil(nb / splits)
    programs = b * hkv * splits
    dev = q3.device
    m = torch.empty(programs, g_pad, device=dev)
    l = torch.empty(programs, g_pad, device=dev)
    acc = torch.empty(programs, g_pad, d_pad, device=dev)
    visited = torch.empty(programs, dtype=torch.int32, device=dev)
    reason = torch.empty(programs, dtype=torch.int32, device=dev)
    vmask = torch.zeros(b * hkv, nb, dtype=torch.int8, device=dev) if store_mask else visited
    i32 = dict(dtype=torch.int32)
    n_cand = n_cand.to(**i32).contiguous()
    cert = CERT_CODES[cfg.certificate] if mode == MODE_CODES["certified"] else 0
    unused = ends   # any tensor stands for a pointer the kernel's constants never read
    tables = (unused,) * 4
    if mode == MODE_CODES["certified"]:
        top, sums, wsums, top_spread = certificate_tables(_padded_bounds(ub, b, hkv, g, nb, dev), order, n_valid,
                                                          n_cand, spread if cert else None)
        tables = (top, sums, wsums if cert else unused, top_spread if cert else unused)
    skip = skip_log.float().contiguous() if mode == MODE_CODES["skip"] else unused
    c_mean = mean.float().contiguous() if cert else unused
    args = (q3, k, v, rows if rows is not None else ends, starts, ends, valid if valid is not None else ends,
            order.to(**i32).contiguous(), need.to(**i32).contiguous(), n_cand, skip, *tables, c_mean,
            m, l, acc, visited, reason, vmask,
            t, nb, g, d, per_split, scale, float(cfg.tau), float(cfg.phi), float(cfg.eps),
            q3.stride(0), q3.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    meta = dict(HKV=hkv, SPLITS=splits, G_PAD=g_pad, D_PAD=d_pad, MODE=mode, CERT=cert,
                PATIENCE=cfg.patience, HAS_ROWS=rows is not None, HAS_VALID=valid is not None,
                STORE_MASK=store_mask, **_chunking(cfg.block_size, max_chunk))
    return _Launch((programs,), args, meta, m, l, acc, visited, reason, vmask, n_cand)


def _padded_bounds(ub: torch.Tensor | None, b: int, hkv: int, g: int, nb: int, device) -> torch.Tensor:
    """(b, hkv, g_pad, nb) fp32 score bounds as the kernel reads them (zeros where there are none)."""
    if ub is None:
        return torch.zeros(b, hkv, _next_pow2(g), nb, device=device)
    return F.pad(ub.float(), (0, 0, 0, _next_pow2(g) - g)).contiguous()


def decode_attention_triton(q, k, v, cfg: ARTConfig, block_scores=None, *, key_padding_mask=None,
                            lengths=None, scale: float | None = None, key_bounds=None,
                            block_budget: int | None = None, num_splits: int = 1,
                            balls=None) -> tuple[torch.Tensor, ARTStats]:
    """`decode_attention` with the Triton kernel (GPU, or CPU under TRITON_INTERPRET=1); any block size.
    balls: kept ball summaries of the first complete blocks, as for `attention.reference.plan_walk`."""
    _need_triton()
    walk = plan_walk(q, k, v, cfg, block_scores, key_padding_mask, lengths, scale, key_bounds, block_budget,
                     balls)
    if not cfg.active:
        return dense_result(q, k, v, walk)
    b, hq, hkv, t, d = check_shapes(q, k, v)
    g, nb = hq // hkv, walk.cand.shape[-1]
    n_cand = walk.cand.sum(-1)
    splits = max(1, min(num_splits, nb))
    dev = q.device
    launch = _launch(q.contiguous().view(b, hq, d), k, v, cfg, MODE_CODES[cfg.mode], rows=None,
                     starts=torch.zeros(b, dtype=torch.int32, device=dev),
                     ends=torch.full((b,), t, dtype=torch.int32, device=dev),
                     valid=walk.valid.to(torch.int8).contiguous(), order=walk.order, n_valid=walk.n_valid,
                     ub=walk.ub, need=walk.need, n_cand=n_cand, t=t,
                     scale=walk.scale, splits=splits, store_mask=True, skip_log=walk.skip_log, mean=walk.mean,
                     spread=walk.spread)
    launch.run()
    # Combine the splits' partial states exactly (splits that visited nothing have l = 0).
    g_pad, d_pad = launch.m.shape[-1], launch.acc.shape[-1]
    m = launch.m.view(b, hkv, splits, g_pad)[..., :g]
    l = launch.l.view(b, hkv, splits, g_pad)[..., :g]
    acc = launch.acc.view(b, hkv, splits, g_pad, d_pad)[..., :g, :d]
    m_all = m.amax(2, keepdim=True)
    w = torch.where(l > 0, torch.exp(m - m_all), torch.zeros_like(l))
    out = (acc * w[..., None]).sum(2) / (l * w).sum(2)[..., None]
    reasons = launch.reason.view(b, hkv, splits)
    stop = torch.where((reasons == 1).any(-1), STOP_STABLE,
                       torch.where((reasons == 2).any(-1), STOP_CERTIFIED, STOP_EXHAUSTED))
    stats = ARTStats(launch.visited.view(b, hkv, splits).sum(-1).long(), n_cand, stop.long(),
                     launch.vmask.view(b, hkv, nb).bool())
    return out.reshape(b, hq, 1, d).to(q.dtype), stats


# ---- decode over rows of a KV pool ------------------------------------------------------------------------

@dataclass
class RowsPlan:
    """A `decode_rows` walk planned on the device (torch ops only, nothing read back to the host)."""

    q: torch.Tensor            # (b, hq, d) contiguous
    rows: torch.Tensor | None  # (b,) int32 pool row per batch entry (None: row i)
    starts: torch.Tensor       # (b,) int32 first valid position
    ends: torch.Tensor         # (b,) int32 one past the last valid position
    n_valid: torch.Tensor      # (b, nb) valid positions per block
    cand: torch.Tensor         # (b, hkv, nb) candidate blocks (after the Quest budget)
    order: torch.Tensor        # (b, hkv, nb) visiting order, candidates first
    need: torch.Tensor         # (b, hkv) blocks always visited (sink, recent, min_blocks)
    ub: torch.Tensor | None    # (b, hkv, g, nb) score bounds (-inf off the candidates), where needed
    scale: float
    mean: torch.Tensor | None = None      # (b, hkv, d) value-aware certificate: the point C
    spread: torch.Tensor | None = None    # (b, hkv, nb) and each block's s_j (`reference.value_spread`)
    skip_log: torch.Tensor | None = None  # (b,) skip mode: ln(skip_lambda / the row's valid positions)


def _row_ints(x, b: int, device, default) -> torch.Tensor:
    """A per-row integer tensor on `device` as int64 (`default` (b,) where x is None); no read-back."""
    return default if x is None else torch.as_tensor(x).to(device=device, dtype=torch.int64)


def rows_key_bounds(k, rows, starts, ends, block_size: int, nb: int, key_bounds=None):
    """(kmin, kmax) (b, hkv, nb, d) fp32 per batch entry: the pool's kept summaries for the complete blocks
    below each row's length, the partial newest block summarised from k; +inf/-inf beyond. Without
    key_bounds, every block from k over the row's valid positions (the whole rows are gathered)."""
    t = k.shape[2]
    if key_bounds is None:
        pos = torch.arange(t, device=k.device)
        valid = (pos >= starts[:, None]) & (pos < ends[:, None])
        return block_key_bounds(k[rows], valid, block_size)
    blk = torch.arange(nb, device=k.device)
    partial = ends // block_size                                   # (b,) the newest block, if incomplete
    pos = partial[:, None] * block_size + torch.arange(block_size, device=k.device)
    live = (pos >= starts[:, None]) & (pos < ends[:, None])        # (b, bs)
    tail = k[rows[:, None], :, pos.clamp(max=t - 1)].float()       # (b, bs, hkv, d): only these keys are read
    live = live[:, :, None, None]
    pmin = tail.masked_fill(~live, math.inf).amin(1)[:, :, None, :]
    pmax = tail.masked_fill(~live, -math.inf).amax(1)[:, :, None, :]
    complete = (blk[None, :] < partial[:, None])[:, None, :, None]
    is_partial = (blk[None, :] == partial[:, None])[:, None, :, None]
    out = []
    for kept, p, empty in ((key_bounds[0], pmin, math.inf), (key_bounds[1], pmax, -math.inf)):
        kept = kept[:, :, :nb][rows].float()                          # only the batch's rows are gathered
        kept = F.pad(kept, (0, 0, 0, nb - kept.shape[2]), value=empty)
        out.append(torch.where(complete, kept, torch.where(is_partial, p, torch.full_like(kept, empty))))
    return out[0], out[1]


def plan_rows(q, k, v, cfg: ARTConfig, *, lengths, starts=None, rows=None, key_bounds=None,
              quest_ratio: float = 0.0, scale: float | None = None, balls=None) -> RowsPlan:
    """The reference's planning (`plan_walk`, per row) for a whole `decode_rows` batch at once, on q's
    device with no host synchronisation: no value is read back, no branch depends on one."""
    b, hq, hkv, t, d = check_rows(q, k, v, cfg, lengths=lengths, starts=starts, rows=rows, key_bounds=key_bounds,
                                  quest_ratio=quest_ratio, balls=balls)
    dev, bs, g = q.device, cfg.block_size, hq // hkv
    nb = -(-t // bs)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    pool_rows = _row_ints(rows, b, dev, None)
    ends = _row_ints(lengths, b, dev, None)
    begins = _row_ints(starts, b, dev, torch.zeros(b, dtype=torch.int64, device=dev))
    blk = torch.arange(nb, device=dev)
    n_valid = (torch.minimum(ends[:, None], (blk + 1) * bs) - torch.maximum(begins[:, None], blk * bs)).clamp_min(0)
    cand = (n_valid > 0)[:, None, :].expand(b, hkv, nb)
    qs = q.float().reshape(b, hkv, g, d) * scale
    ub = score = None
    gather = pool_rows if pool_rows is not None else torch.arange(b, device=dev)
    # key balls (box+ball) and value spreads (value-aware certificate): the pool's kept ones where given,
    # the rest from the batch's rows, never the whole pool
    balls, values = (rows_summaries(k, v, cfg, gather, begins, ends, n_valid, kept=balls)
                     if cfg.uses_ball or cfg.uses_values else (None, None))
    if cfg.uses_bounds or quest_ratio > 0:   # bound order, certified mode, Quest: all rank by the bound
        kmin, kmax = rows_key_bounds(k, gather, begins, ends, bs, nb, key_bounds)
        ub = upper_bounds(qs, kmin, kmax)
        if balls is not None:
            ub = torch.minimum(ub, ball_bounds(qs, *balls))
        ub = ub.masked_fill(~cand[:, :, None, :], -math.inf)
        score = ub.amax(2)
    order, n_protected = visiting_order(cand, (ends - 1) // bs, cfg, score)
    if quest_ratio > 0:   # Quest: each row keeps its own share of its candidate blocks, the first of the order
        budget = torch.ceil(cand.sum(-1).double() * (1.0 - quest_ratio)).clamp_min(1).long()
        kept = blk < torch.maximum(n_protected, budget)[..., None]
        cand = cand & torch.zeros_like(kept).scatter(-1, order, kept)
    need = n_protected.clamp_min(cfg.min_blocks)
    i32 = dict(dtype=torch.int32)
    plan = RowsPlan(q.contiguous(), pool_rows.to(**i32) if pool_rows is not None else None, begins.to(**i32),
                    ends.to(**i32), n_valid, cand, order, need, ub, scale)
    if values is not None:
        plan.mean, plan.spread = values
    if cfg.active and cfg.mode == "skip":   # as plan_walk: the row's valid positions are [begins, ends)
        plan.skip_log = math.log(cfg.skip_lambda) - torch.log((ends - begins).float())
    return plan


def prepare_rows(q, k, v, cfg: ARTConfig, *, max_chunk: int | None = None, **kwargs) -> _Launch:
    """Plan a `decode_rows` call and prepare its kernel launch (`plan_rows`'s arguments): device work only."""
    plan = plan_rows(q, k, v, cfg, **kwargs)
    return _launch(plan.q, k, v, cfg, MODE_CODES[cfg.mode] if cfg.active else 0, rows=plan.rows,
                   starts=plan.starts, ends=plan.ends, valid=None, order=plan.order, n_valid=plan.n_valid,
                   ub=plan.ub, need=plan.need, n_cand=plan.cand.sum(-1), t=k.shape[2], scale=plan.scale,
                   max_chunk=max_chunk, skip_log=plan.skip_log, mean=plan.mean, spread=plan.spread)


def finish_rows(launch: _Launch, q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (b, hq, d) in q's dtype, visited (b,), candidates (b,)) from a run launch (one split)."""
    b, hq, d = q.shape
    hkv = launch.meta["HKV"]
    g = hq // hkv
    out = launch.acc[:, :g, :d] / launch.l[:, :g, None]
    return (out.reshape(b, hq, d).to(q.dtype), launch.visited.view(b, hkv).sum(-1, dtype=torch.int64),
            launch.n_cand.view(b, hkv).sum(-1, dtype=torch.int64))


def decode_rows_triton(q, k, v, cfg: ARTConfig, *, lengths, starts=None, rows=None, key_bounds=None,
                       quest_ratio: float = 0.0, scale: float | None = None, max_chunk: int | None = None,
                       balls=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`attention.kernels.dispatch.decode_rows` with the Triton kernel (see there): no host
    synchronisation; the statistics stay on the device. max_chunk: positions loaded at once (tests)."""
    _need_triton()
    launch = prepare_rows(q, k, v, cfg, lengths=lengths, starts=starts, rows=rows, key_bounds=key_bounds,
                          quest_ratio=quest_ratio, scale=scale, max_chunk=max_chunk, balls=balls)
    launch.run()
    return finish_rows(launch, q)

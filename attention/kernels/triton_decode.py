"""Triton ART decode kernel: split-KV, fp32 online-softmax state, the ART check inside the block loop.

Same signature and semantics as `attention.reference.decode_attention` (its oracle): the host computes
the visiting order with the reference's `visiting_order`, and each program walks one (sequence, KV head,
split) over its share of that order with all query heads of the GQA group, stopping on its own. With
one split the kernel makes exactly the reference's decisions; with several, each split stops on its own
and writes a valid partial (m, l, acc) that the combine step merges exactly for what was visited.
Tested on CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math

import torch

from attention.config import ARTConfig
from attention.reference import (STOP_CERTIFIED, STOP_EXHAUSTED, STOP_STABLE, ARTStats, check_shapes,
                                 dense_result, plan_walk)

try:
    import triton
    import triton.language as tl
except ImportError:   # the reference still works; `decode_attention_triton` says what is missing
    triton = None


if triton is not None:

    @triton.jit
    def _art_decode_kernel(
        q_ptr, k_ptr, v_ptr, valid_ptr, order_ptr, nvalid_ptr, ub_ptr, need_ptr, ncand_ptr,
        m_out, l_out, acc_out, visited_out, reason_out, vmask_out,
        T, NB, G, D, blocks_per_split, scale, tau, phi, eps,
        sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
        HKV: tl.constexpr, SPLITS: tl.constexpr, BS: tl.constexpr, G_PAD: tl.constexpr,
        D_PAD: tl.constexpr, NB_PAD: tl.constexpr, MODE: tl.constexpr, PATIENCE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = pid % SPLITS
        bh = pid // SPLITS
        b = bh // HKV
        h = bh % HKV
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_t = tl.arange(0, BS)
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
        offs_n = tl.arange(0, NB_PAD)
        if MODE == 2:   # certified: bounds and sizes of the blocks in visiting order
            ord_all = tl.load(order_ptr + bh * NB + offs_n, mask=offs_n < NB, other=0)
            nval_all = tl.load(nvalid_ptr + b * NB + ord_all, mask=offs_n < NB, other=0).to(tl.float32)
            ub_all = tl.load(ub_ptr + (bh * G_PAD + offs_g)[:, None] * NB + ord_all[None, :],
                             mask=gmask[:, None] & (offs_n < NB)[None, :], other=float("-inf"))
        j = start
        run = start * 0      # int32 scalars (loop-carried types must not change)
        reason = start * 0
        while (j < end) & (reason == 0):
            blk = tl.load(order_ptr + bh * NB + j)
            pos = blk * BS + offs_t
            inside = pos < T
            valid = tl.load(valid_ptr + b * T + pos, mask=inside, other=0) != 0
            kb = tl.load(k_ptr + b * sk_b + h * sk_h + pos[:, None] * sk_t + offs_d[None, :],
                         mask=inside[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            vb = tl.load(v_ptr + b * sv_b + h * sv_h + pos[:, None] * sv_t + offs_d[None, :],
                         mask=inside[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(kb), input_precision="ieee")
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, vb, input_precision="ieee")
            m = m_new
            tl.store(vmask_out + bh * NB + blk, 1)
            j += 1
            visited = j - start
            o = acc / l[:, None]
            may_stop = (visited >= need - start) & (j < n_cand)
            if MODE == 1:   # stability: magnitude and direction change of the running output
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
            else:
                rest = tl.sum(tl.where((offs_n >= j)[None, :] & (offs_n < n_cand)[None, :],
                                       nval_all[None, :] * tl.exp(ub_all - m[:, None]), 0.0), 1)
                bound = tl.where(gmask, rest / (l + rest), 0.0)
                if may_stop & (tl.max(bound, 0) <= eps):
                    reason = 2
            o_prev = o
        out_row = pid
        tl.store(m_out + out_row * G_PAD + offs_g, m)
        tl.store(l_out + out_row * G_PAD + offs_g, l)
        tl.store(acc_out + (out_row * G_PAD + offs_g)[:, None] * D_PAD + offs_d[None, :], acc)
        tl.store(visited_out + out_row, j - start)
        tl.store(reason_out + out_row, reason)


def _next_pow2(x: int, at_least: int = 16) -> int:
    return max(at_least, 1 << (max(x, 1) - 1).bit_length())


def decode_attention_triton(q, k, v, cfg: ARTConfig, block_scores=None, *, key_padding_mask=None,
                            lengths=None, scale: float | None = None, key_bounds=None,
                            block_budget: int | None = None, num_splits: int = 1) -> tuple[torch.Tensor, ARTStats]:
    """`decode_attention` with the Triton kernel (GPU, or CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        raise ImportError("the Triton kernel needs `triton` (pip install triton); use "
                          "attention.reference.decode_attention otherwise")
    bs = cfg.block_size
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two block_size >= 16, got {bs}")
    walk = plan_walk(q, k, v, cfg, block_scores, key_padding_mask, lengths, scale, key_bounds, block_budget)
    if not cfg.active:
        return dense_result(q, k, v, walk)
    b, hq, hkv, t, d = check_shapes(q, k, v)
    g, nb = hq // hkv, walk.cand.shape[-1]
    g_pad, d_pad = _next_pow2(g), _next_pow2(d)
    ub = torch.zeros(b, hkv, g_pad, nb, device=q.device)
    if walk.ub is not None:
        ub[:, :, :g] = walk.ub
    n_cand = walk.cand.sum(-1)
    splits = max(1, min(num_splits, nb))
    per_split = math.ceil(nb / splits)
    rows = b * hkv * splits
    dev = q.device
    m = torch.empty(rows, g_pad, device=dev)
    l = torch.empty(rows, g_pad, device=dev)
    acc = torch.empty(rows, g_pad, d_pad, device=dev)
    visited = torch.empty(rows, dtype=torch.int32, device=dev)
    reason = torch.empty(rows, dtype=torch.int32, device=dev)
    vmask = torch.zeros(b * hkv, nb, dtype=torch.int8, device=dev)
    kc, vc = k.contiguous(), v.contiguous()
    qc = q.contiguous().view(b, hq, d)
    _art_decode_kernel[(rows,)](
        qc, kc, vc, walk.valid.to(torch.int8).contiguous(), walk.order.to(torch.int32).contiguous(),
        walk.n_valid.to(torch.int32).contiguous(), ub.contiguous(), walk.need.to(torch.int32).contiguous(),
        n_cand.to(torch.int32).contiguous(), m, l, acc, visited, reason, vmask,
        t, nb, g, d, per_split, walk.scale, float(cfg.tau), float(cfg.phi), float(cfg.eps),
        qc.stride(0), qc.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2),
        HKV=hkv, SPLITS=splits, BS=bs, G_PAD=g_pad, D_PAD=d_pad, NB_PAD=_next_pow2(nb, 1),
        MODE=1 if cfg.mode == "stability" else 2, PATIENCE=cfg.patience,
    )
    # Combine the splits' partial states exactly (splits that visited nothing have l = 0).
    m = m.view(b, hkv, splits, g_pad)[..., :g]
    l = l.view(b, hkv, splits, g_pad)[..., :g]
    acc = acc.view(b, hkv, splits, g_pad, d_pad)[..., :g, :d]
    m_all = m.amax(2, keepdim=True)
    w = torch.where(l > 0, torch.exp(m - m_all), torch.zeros_like(l))
    out = (acc * w[..., None]).sum(2) / (l * w).sum(2)[..., None]
    reasons = reason.view(b, hkv, splits)
    stop = torch.where((reasons == 1).any(-1), STOP_STABLE,
                       torch.where((reasons == 2).any(-1), STOP_CERTIFIED, STOP_EXHAUSTED))
    stats = ARTStats(visited.view(b, hkv, splits).sum(-1).long(), n_cand, stop.long(),
                     vmask.view(b, hkv, nb).bool())
    return out.reshape(b, hq, 1, d).to(q.dtype), stats

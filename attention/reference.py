"""The reference ART decode attention in PyTorch: the oracle for every faster kernel.

One query token per sequence attends over its KV cache block by block with an online softmax in fp32.
Blocks are visited sink first, then the newest, then the rest (by certified upper bound, by policy score,
or newest to oldest); each (sequence, KV head) stops on its own, all query heads of a GQA group together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attention.config import ARTConfig

STOP_EXHAUSTED, STOP_STABLE, STOP_CERTIFIED = 0, 1, 2
RADIUS_SLACK = 1e-5   # balls' radii grow by this (relative) so fp32 rounding never lets a vector escape


@dataclass
class ARTStats:
    """Per (sequence, KV head): blocks that held candidate positions, blocks visited, why it stopped
    (0 walked every candidate, 1 stable, 2 certified) and which blocks were visited. In skip mode every
    candidate block's keys are read and `visited` counts the blocks whose values were read."""

    visited_blocks: torch.Tensor      # (batch, kv_heads) int64
    candidate_blocks: torch.Tensor    # (batch, kv_heads) int64
    stop_reason: torch.Tensor         # (batch, kv_heads) int64
    visited_mask: torch.Tensor        # (batch, kv_heads, n_blocks) bool

    @property
    def skipped_fraction(self) -> float:
        total = int(self.candidate_blocks.sum())
        return 1.0 - int(self.visited_blocks.sum()) / total if total else 0.0


def valid_positions(batch: int, length: int, device, key_padding_mask=None, lengths=None) -> torch.Tensor:
    """(batch, T) bool: which cached positions exist. `lengths` counts valid positions from the start;
    `key_padding_mask` is True where a position may be attended."""
    valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=device)
        if lengths.shape != (batch,) or int(lengths.min()) < 1 or int(lengths.max()) > length:
            raise ValueError(f"lengths must be ({batch},) integers in [1, {length}], got {lengths.tolist()}")
        valid &= torch.arange(length, device=device) < lengths[:, None]
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, length):
            raise ValueError(f"key_padding_mask must be ({batch}, {length}), got {tuple(key_padding_mask.shape)}")
        valid &= key_padding_mask.to(device=device, dtype=torch.bool)
    if not bool(valid.any(-1).all()):
        raise ValueError("every sequence needs at least one valid key position")
    return valid


def check_shapes(q, k, v) -> tuple[int, int, int, int, int]:
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be (batch, q_heads, 1, head_dim), got {tuple(q.shape)}")
    if k.dim() != 4 or k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must be (batch, kv_heads, T, head_dim), got {tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, _, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit k {tuple(k.shape)} (q_heads must be a multiple "
                         "of kv_heads)")
    return b, hq, hkv, t, d


def dense_attention(q, k, v, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain SDPA over the valid positions (what ART off returns)."""
    mask = valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def block_key_bounds(k: torch.Tensor, valid: torch.Tensor, block_size: int):
    """Channel-wise min and max of the keys of each block (Quest's page summaries), fp32,
    (batch, kv_heads, n_blocks, head_dim); +inf/-inf for blocks without valid positions."""
    b, h, t, d = k.shape
    nb = math.ceil(t / block_size)
    pad = nb * block_size - t
    kf = F.pad(k.float(), (0, 0, 0, pad)).view(b, h, nb, block_size, d)
    vb = F.pad(valid, (0, pad)).view(b, 1, nb, block_size, 1)
    kmin = kf.masked_fill(~vb, math.inf).amin(3)
    kmax = kf.masked_fill(~vb, -math.inf).amax(3)
    return kmin, kmax


def block_balls(x: torch.Tensor, valid: torch.Tensor, block_size: int):
    """Per block, the ball holding its valid vectors: centroid (batch, kv_heads, n_blocks, d) fp32 and
    radius max ||x - centroid|| (batch, kv_heads, n_blocks), grown by RADIUS_SLACK; 0 and 0 for blocks
    without valid positions (NaN at invalid positions is never read)."""
    b, h, t, d = x.shape
    nb = math.ceil(t / block_size)
    pad = nb * block_size - t
    xf = F.pad(x.float(), (0, 0, 0, pad)).view(b, h, nb, block_size, d)
    vb = F.pad(valid, (0, pad)).view(b, 1, nb, block_size, 1)
    xf = xf.masked_fill(~vb, 0.0)
    center = xf.sum(3) / vb.sum(3).clamp_min(1)
    radius = (xf - center[:, :, :, None]).norm(dim=-1).masked_fill(~vb[..., 0], 0.0).amax(3)
    return center, radius * (1 + RADIUS_SLACK)


def complete_balls(x: torch.Tensor, valid: torch.Tensor, block_size: int, kept=None):
    """`block_balls(x, valid, block_size)`, reusing kept balls of the first blocks: kept is None or
    (center (b, h, done, d), radius (b, h, done)) fp32 of the first `done` complete blocks, each made by
    `block_balls` from that block's own vectors with every position valid (as `attention.cache` keeps them);
    only the other blocks are summarised from x, with the same function, so the result is what
    `block_balls` gives on the whole of x. A kept block holding a position `valid` masks is recomputed."""
    if kept is None or kept[0] is None:
        return block_balls(x, valid, block_size)
    center, radius = kept
    b, h, t, d = x.shape
    done = center.shape[2]
    if center.shape[:2] != (b, h) or center.shape[3] != d or radius.shape != center.shape[:3] \
            or done * block_size > t:
        raise ValueError(f"kept balls must be ({b}, {h}, <= {t // block_size}, {d}) centres and matching radii, "
                         f"got {tuple(center.shape)}, {tuple(radius.shape)}")
    parts = [(center.float(), radius.float())]
    if t > done * block_size:
        parts.append(block_balls(x[:, :, done * block_size:], valid[:, done * block_size:], block_size))
    center, radius = torch.cat([c for c, _ in parts], 2), torch.cat([r for _, r in parts], 2)
    if done:   # kept blocks holding a masked position (left padding) are summarised again, with the mask
        masked = ~valid[:, : done * block_size].reshape(valid.shape[0], done, block_size).all(-1).all(0)
        if bool(masked.any()):
            redo = masked.nonzero()[:, 0]
            xs = x[:, :, : done * block_size].unflatten(2, (done, block_size))[:, :, redo].flatten(2, 3)
            vs = valid[:, : done * block_size].unflatten(1, (done, block_size))[:, redo].flatten(1, 2)
            center[:, :, redo], radius[:, :, redo] = block_balls(xs, vs, block_size)
    return center, radius


def ball_bounds(q_scaled: torch.Tensor, center: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """ub[b, h, g, j] >= every score of block j from its key ball: q.c_j + ||q|| r_j."""
    return (torch.einsum("bhgd,bhnd->bhgn", q_scaled, center)
            + q_scaled.norm(dim=-1)[..., None] * radius[:, :, None, :])


def value_spread(v: torch.Tensor, valid: torch.Tensor, block_size: int, n_valid: torch.Tensor):
    """For the value-aware certificate: a per-(sequence, KV head) point C (the valid values' mean, from
    the block centroids) and per block s_j = r_j + ||c_j - C|| (every value of block j lies within s_j of
    C); C (b, hkv, d), s (b, hkv, nb). Any C gives a valid bound; the mean keeps it small."""
    return value_spread_from_balls(*block_balls(v, valid, block_size), n_valid)


def value_spread_from_balls(center: torch.Tensor, radius: torch.Tensor, n_valid: torch.Tensor):
    """`value_spread` from the value balls (center, radius) of every block (as `block_balls` gives them)."""
    w = n_valid[:, None, :, None].float()
    mean = (center * w).sum(2) / w.sum(2).clamp_min(1)
    spread = radius + (center - mean[:, :, None]).norm(dim=-1)
    return mean, spread * (1 + RADIUS_SLACK)


def row_valid(t: int, begins: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """(b, t) bool: positions [begins[i], ends[i]) of each batch entry's row, on their device, no read-back."""
    pos = torch.arange(t, device=ends.device)
    return (pos >= begins[:, None]) & (pos < ends[:, None])


def rows_balls(x, rows, begins, ends, block_size: int, nb: int, kept=None):
    """(centres (b, h, nb, d), radii (b, h, nb)) fp32: what `block_balls` gives for each batch entry's pool
    row rows[i] of x over positions [begins[i], ends[i]), without a host synchronisation.

    kept: None (the b rows are gathered and summarised whole) or the pool's balls of complete blocks,
    (centres (S, h, >= T // block_size, d), radii (S, h, >= T // block_size)), each made by `block_balls`
    from that block's own vectors: blocks wholly inside [begins, ends) come from them, and only each row's
    first and last block (which the window's start or the newest position may cut) are read from x."""
    t = x.shape[2]
    if kept is None:
        return block_balls(x[rows], row_valid(t, begins, ends), block_size)
    b, h, d, dev = rows.shape[0], x.shape[1], x.shape[3], x.device
    blk = torch.arange(nb, device=dev)
    edges = torch.stack([begins // block_size, (ends - 1) // block_size], 1)           # (b, 2)
    pos = edges[:, :, None] * block_size + torch.arange(block_size, device=dev)        # (b, 2, bs)
    live = (pos >= begins[:, None, None]) & (pos < ends[:, None, None])
    vecs = x[rows[:, None, None], :, pos.clamp(max=t - 1)]                             # (b, 2, bs, h, d)
    e_center, e_radius = block_balls(vecs.permute(0, 1, 3, 2, 4).reshape(2 * b, h, block_size, d),
                                     live.reshape(2 * b, block_size), block_size)
    e_center, e_radius = e_center.view(b, 2, h, d), e_radius.view(b, 2, h)
    inside = ((blk * block_size >= begins[:, None]) & ((blk + 1) * block_size <= ends[:, None]))[:, None, :]
    first, last = (blk[None, :] == edges[:, :1])[:, None, :], (blk[None, :] == edges[:, 1:])[:, None, :]
    out = []
    for kept_x, edge in ((kept[0], e_center), (kept[1], e_radius)):
        have = kept_x[rows][:, :, :nb].float()                      # only the batch's rows are gathered
        have = F.pad(have, (0, 0, 0, nb - have.shape[2]) if have.dim() == 4 else (0, nb - have.shape[2]))
        wide = (lambda m: m[..., None]) if have.dim() == 4 else (lambda m: m)
        got = torch.where(wide(inside), have, torch.zeros((), device=dev))
        got = torch.where(wide(first), edge[:, 0, :, None], got)
        out.append(torch.where(wide(last), edge[:, 1, :, None], got))
    return out[0], out[1]


def rows_summaries(k, v, cfg: ARTConfig, rows, begins, ends, n_valid, kept=None):
    """The ball summaries a `decode_rows` batch needs for `cfg` (b rows gathered, never the pool):
    ((key centers, key radii) or None, (value mean, value spread) or None), as `block_balls` and
    `value_spread` give them per row over positions [begins, ends); n_valid (b, nb). kept: None or the
    pool's balls of complete blocks (key centres, key radii, value centres, value radii; see `rows_balls`)."""
    nb = n_valid.shape[1]
    balls = rows_balls(k, rows, begins, ends, cfg.block_size, nb, kept[:2] if kept else None) \
        if cfg.uses_ball else None
    values = value_spread_from_balls(*rows_balls(v, rows, begins, ends, cfg.block_size, nb,
                                                 kept[2:] if kept else None), n_valid) if cfg.uses_values else None
    return balls, values


def certified_error(rest, weighted, top_spread, l, o, mean):
    """The value-aware bound on ||o_exact - o|| per query head, given the unvisited mass bound
    rest = sum n_j exp(ub_j - m), weighted = sum n_j exp(ub_j - m) s_j and top_spread = max s_j over the
    unvisited blocks: min(W (||C - o|| + max s), (||C - o|| rest + weighted) / l), W = rest / (l + rest)."""
    to_mean = (o - mean).norm(dim=-1)
    return torch.minimum(rest / (l + rest) * (to_mean + top_spread), (to_mean * rest + weighted) / l)


def upper_bounds(q_scaled: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """ub[b, h, g, j] >= every score of block j: sum_c max(q_c kmin_c, q_c kmax_c). q_scaled is
    (batch, kv_heads, group, d) with the softmax scale folded in."""
    lo = torch.einsum("bhgd,bhnd->bhgnd", q_scaled, kmin.nan_to_num(posinf=0.0))
    hi = torch.einsum("bhgd,bhnd->bhgnd", q_scaled, kmax.nan_to_num(neginf=0.0))
    ub = torch.maximum(lo, hi).sum(-1)
    empty = torch.isinf(kmin).all(-1)[:, :, None, :]
    return ub.masked_fill(empty, -math.inf)


def visiting_order(cand: torch.Tensor, last_block: torch.Tensor, cfg: ARTConfig,
                   score: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, n_protected): block indices per (batch, kv_head) in visiting order (sink blocks, then the
    `recent_blocks` newest, then by descending score, else newest first; blocks without candidates
    last), and how many candidate blocks are protected (sink + recent) per (batch, kv_head)."""
    b, h, nb = cand.shape
    idx = torch.arange(nb, device=cand.device)
    sink = (idx * cfg.block_size < cfg.sink_tokens)[None, None, :]
    recent = ((idx[None, :] <= last_block[:, None]) &
              (idx[None, :] > last_block[:, None] - cfg.recent_blocks))[:, None, :]
    tier = torch.where(sink, 2, torch.where(recent, 1, 0)).expand(b, h, nb)
    tier = torch.where(cand, tier, -1)
    key = (score if score is not None else idx.to(torch.float32).expand(b, h, nb)).float()
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, torch.sort(tier.gather(-1, order), dim=-1, descending=True, stable=True).indices)
    return order, (tier >= 1).sum(-1)


@dataclass
class Walk:
    """Everything a kernel needs to walk the blocks, computed once on the host (shared by the
    reference and the Triton kernel, so both make the same visiting decisions)."""

    valid: torch.Tensor        # (b, T) bool
    n_valid: torch.Tensor      # (b, nb) valid positions per block
    cand: torch.Tensor         # (b, hkv, nb) blocks holding candidate positions
    order: torch.Tensor        # (b, hkv, nb) visiting order, candidates first
    need: torch.Tensor         # (b, hkv) blocks always visited (sink, recent, min_blocks)
    q_scaled: torch.Tensor     # (b, hkv, g, d) fp32 with the softmax scale folded in
    ub: torch.Tensor | None    # (b, hkv, g, nb) score upper bounds (certified mode, Quest)
    scale: float
    block_size: int
    mean: torch.Tensor | None = None     # (b, hkv, d) value-aware certificate: the point C
    spread: torch.Tensor | None = None   # (b, hkv, nb) and each block's s_j (see `value_spread`)
    skip_log: torch.Tensor | None = None  # (b,) skip mode: ln(skip_lambda / context) per sequence


def plan_walk(q, k, v, cfg: ARTConfig, block_scores=None, key_padding_mask=None, lengths=None,
              scale: float | None = None, key_bounds=None, block_budget: int | None = None, balls=None) -> Walk:
    """block_budget: the Quest policy, keep only that many blocks per (sequence, KV head), the ones
    with the highest key-bound score for this query (sink and recent blocks always kept).
    balls: None or kept (key centres, key radii, value centres, value radii) of the first complete blocks
    (any may be None; see `complete_balls`), so only the other blocks are summarised from k and v."""
    b, hq, hkv, t, d = check_shapes(q, k, v)
    if block_budget is not None and (isinstance(block_budget, bool) or block_budget < 1):
        raise ValueError(f"block_budget must be a positive number of blocks, got {block_budget!r}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    valid = valid_positions(b, t, k.device, key_padding_mask, lengths)
    bs = cfg.block_size
    nb = math.ceil(t / bs)
    n_valid = F.pad(valid, (0, nb * bs - t)).view(b, nb, bs).sum(-1)
    cand = (n_valid > 0)[:, None, :].expand(b, hkv, nb)
    qs = q.float().view(b, hkv, hq // hkv, d) * scale
    ub = None
    score = block_scores
    if score is not None and score.shape != (b, hkv, nb):
        raise ValueError(f"block_scores must be ({b}, {hkv}, {nb}), got {tuple(score.shape)}")
    if cfg.uses_bounds or block_budget is not None:
        kmin, kmax = key_bounds if key_bounds is not None else block_key_bounds(k, valid, bs)
        ub = upper_bounds(qs, kmin, kmax)
        if cfg.uses_ball:
            ub = torch.minimum(ub, ball_bounds(qs, *complete_balls(k, valid, bs, balls[:2] if balls else None)))
        if cfg.mode == "certified" or score is None:
            score = ub.amax(2)
    last_block = (t - 1 - valid.flip(-1).int().argmax(-1)) // bs
    order, n_protected = visiting_order(cand, last_block, cfg, score)
    if block_budget is not None:   # Quest: the first `keep` blocks of the order stay candidates
        keep = torch.clamp(n_protected, min=block_budget)
        kept = torch.arange(nb, device=k.device) < keep[..., None]
        cand = cand & torch.zeros_like(kept).scatter(-1, order, kept)
    need = torch.maximum(n_protected, torch.full_like(n_protected, cfg.min_blocks))
    walk = Walk(valid, n_valid, cand, order, need, qs, ub, scale, bs)
    if cfg.uses_values:
        walk.mean, walk.spread = value_spread_from_balls(
            *complete_balls(v, valid, bs, balls[2:] if balls else None), n_valid)
    if cfg.active and cfg.mode == "skip":
        walk.skip_log = math.log(cfg.skip_lambda) - torch.log(valid.sum(-1).float())
    return walk


def dense_result(q, k, v, walk: Walk) -> tuple[torch.Tensor, ARTStats]:
    """ART off: plain SDPA over the candidate positions, every candidate block counted as visited."""
    n = walk.cand.sum(-1)
    stats = ARTStats(n, n.clone(), torch.zeros_like(n), walk.cand.clone())
    if bool(walk.cand.eq(walk.n_valid[:, None, :] > 0).all()):   # no policy restriction: one mask
        return dense_attention(q, k, v, walk.valid, walk.scale), stats
    blk_of = torch.arange(walk.valid.shape[-1], device=k.device) // walk.block_size
    per_head = walk.valid[:, None, :] & walk.cand[:, :, blk_of]           # (b, hkv, T)
    mask = per_head.repeat_interleave(q.shape[1] // k.shape[1], 1)[:, :, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=walk.scale,
                                          enable_gqa=q.shape[1] != k.shape[1]), stats


def dense_off(q, k, v, cfg: ARTConfig, key_padding_mask=None, lengths=None, scale=None):
    """ART off without a Quest budget: one SDPA call (no mask when nothing is masked, so SDPA keeps its
    fast GQA path) and stats that count every candidate block as visited."""
    b, hq, hkv, t, d = check_shapes(q, k, v)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nb = math.ceil(t / cfg.block_size)
    if key_padding_mask is None and lengths is None:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=hq != hkv)
        cand = torch.ones(b, hkv, nb, dtype=torch.bool, device=q.device)
    else:
        valid = valid_positions(b, t, k.device, key_padding_mask, lengths)
        out = dense_attention(q, k, v, valid, scale)
        per_block = F.pad(valid, (0, nb * cfg.block_size - t)).view(b, nb, cfg.block_size).any(-1)
        cand = per_block[:, None, :].expand(b, hkv, nb).clone()
    n = cand.sum(-1)
    return out, ARTStats(n, n.clone(), torch.zeros_like(n), cand)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ARTConfig,
                     block_scores: torch.Tensor | None = None, *, key_padding_mask=None, lengths=None,
                     scale: float | None = None, key_bounds=None,
                     block_budget: int | None = None, balls=None) -> tuple[torch.Tensor, ARTStats]:
    """Decode attention with ART on top of the given KV (already reduced by any KV policy).

    q: (batch, q_heads, 1, d); k, v: (batch, kv_heads, T, d), GQA when q_heads > kv_heads.
    block_scores: optional (batch, kv_heads, n_blocks) policy scores ordering the non-protected blocks.
    key_padding_mask (batch, T) True where attendable, or lengths (batch,): ragged batches.
    key_bounds: optional precomputed (kmin, kmax) from `block_key_bounds` (kept with the cache).
    block_budget: the Quest policy (query-aware block selection from the same key bounds).
    balls: optional kept (key centres, key radii, value centres, value radii) of the first complete blocks
    (as `attention.cache` keeps them; see `plan_walk`).
    Returns the output (batch, q_heads, 1, d) in q's dtype and the per-(sequence, kv head) stats.
    """
    if not cfg.active and block_budget is None:
        return dense_off(q, k, v, cfg, key_padding_mask, lengths, scale)
    walk = plan_walk(q, k, v, cfg, block_scores, key_padding_mask, lengths, scale, key_bounds, block_budget,
                     balls)
    if not cfg.active:
        return dense_result(q, k, v, walk)
    b, hq, hkv, t, d = check_shapes(q, k, v)
    g, bs = hq // hkv, cfg.block_size
    nb = walk.cand.shape[-1]
    pad = nb * bs - t
    valid_b = F.pad(walk.valid, (0, pad)).view(b, nb, bs)
    n_valid, cand, order, need, qs, ub = walk.n_valid, walk.cand, walk.order, walk.need, walk.q_scaled, walk.ub
    kf = F.pad(k.float(), (0, 0, 0, pad)).view(b, hkv, nb, bs, d)
    vf = F.pad(v.float(), (0, 0, 0, pad)).view(b, hkv, nb, bs, d)

    m = torch.full((b, hkv, g), -math.inf, device=q.device)
    l = torch.zeros(b, hkv, g, device=q.device)
    acc = torch.zeros(b, hkv, g, d, device=q.device)
    o_prev = torch.zeros_like(acc)
    active = torch.ones(b, hkv, dtype=torch.bool, device=q.device)
    stable_run = torch.zeros(b, hkv, dtype=torch.long, device=q.device)
    visited = torch.zeros(b, hkv, dtype=torch.long, device=q.device)
    visited_mask = torch.zeros(b, hkv, nb, dtype=torch.bool, device=q.device)
    reason = torch.full((b, hkv), STOP_EXHAUSTED, dtype=torch.long, device=q.device)
    bi = torch.arange(b, device=q.device)[:, None]
    hi = torch.arange(hkv, device=q.device)[None, :]
    n_cand = cand.sum(-1)

    for j in range(nb):
        blk = order[..., j]                                           # (b, hkv)
        step = active & cand[bi, hi, blk]
        if not bool(step.any()):
            break
        s = torch.einsum("bhgd,bhtd->bhgt", qs, kf[bi, hi, blk])
        s = s.masked_fill(~valid_b[bi, blk][:, :, None, :], -math.inf)
        if cfg.mode == "skip":   # keys read; the softmax and values only where some score may still count
            faint = (s.amax(-1) - m < walk.skip_log[:, None, None]).all(-1)
            step = step & ~faint
        m_new = torch.maximum(m, s.amax(-1))
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new[..., None])
        l_new = l * alpha + p.sum(-1)
        acc_new = acc * alpha[..., None] + torch.einsum("bhgt,bhtd->bhgd", p, vf[bi, hi, blk])
        st = step[..., None]
        m, l = torch.where(st, m_new, m), torch.where(st, l_new, l)
        acc = torch.where(st[..., None], acc_new, acc)
        visited += step
        visited_mask[bi, hi, blk] |= step
        o = acc / l[..., None]
        may_stop = step & (visited >= need) & (visited < n_cand)
        if cfg.mode == "stability":
            d_mag = (o - o_prev).norm(dim=-1) / o_prev.norm(dim=-1).clamp_min(1e-30)
            d_dir = 1.0 - F.cosine_similarity(o, o_prev, dim=-1, eps=1e-30)
            stable = ((d_mag < cfg.tau) & (d_dir < cfg.phi)).all(-1)   # the whole GQA group
            # Only blocks beyond the always-visited ones (sink, recent, min_blocks) count toward patience.
            checked = step & (visited > need)
            stable_run = torch.where(checked, torch.where(stable, stable_run + 1, 0), stable_run)
            stop = may_stop & checked & (stable_run >= cfg.patience)
            reason = torch.where(stop, STOP_STABLE, reason)
        elif cfg.mode == "certified":
            unvisited = (cand & ~visited_mask)[:, :, None, :]
            mass = (n_valid[:, None, None, :] * torch.exp(ub - m[..., None])).masked_fill(~unvisited, 0.0)
            rest = mass.sum(-1)
            if cfg.certificate == "mass":
                ok = rest / (l + rest) <= cfg.eps
            else:
                spread = walk.spread[:, :, None, :]
                top = spread.masked_fill(~unvisited, 0.0).amax(-1)
                err = certified_error(rest, (mass * spread).sum(-1), top, l, o, walk.mean[:, :, None, :])
                ok = err <= cfg.eps * (o.norm(dim=-1) if cfg.certificate == "relative" else 1.0)
            stop = may_stop & ok.all(-1)
            reason = torch.where(stop, STOP_CERTIFIED, reason)
        else:
            stop = torch.zeros_like(step)
        o_prev = torch.where(st[..., None], o, o_prev)
        active &= ~stop

    out = (acc / l[..., None]).view(b, hq, 1, d).to(q.dtype)
    return out, ARTStats(visited, n_cand, reason, visited_mask)


# ---- decode over rows of a KV pool (the serving engine's layout) ----------------------------------------

def check_rows(q, k, v, cfg: ARTConfig, *, lengths, starts=None, rows=None, key_bounds=None,
               quest_ratio: float = 0.0, balls=None) -> tuple[int, int, int, int, int]:
    """Shapes and types of a `decode_rows` call, never its values (on CUDA reading them would make the
    host wait for the device). Returns (b, q_heads, kv_heads, T, d)."""
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, q_heads, head_dim), got {tuple(q.shape)}")
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must be (pool_rows, kv_heads, T, head_dim), got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, hq, d = q.shape
    _, hkv, t, _ = k.shape
    if k.shape[3] != d or v.shape[3] != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit k {tuple(k.shape)} (q_heads must be a multiple "
                         "of kv_heads)")
    if lengths is None:
        raise ValueError("decode_rows needs lengths (one per batch entry)")
    for name, x in (("lengths", lengths), ("starts", starts), ("rows", rows)):
        if x is None:
            continue
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else (len(x),)
        if shape != (b,) or (isinstance(x, torch.Tensor) and (x.dtype.is_floating_point or x.dtype == torch.bool)):
            raise ValueError(f"{name} must be ({b},) integers, got {x!r}")
    if isinstance(quest_ratio, bool) or not 0.0 <= float(quest_ratio) < 1.0:
        raise ValueError(f"quest_ratio must be in [0, 1), got {quest_ratio!r}")
    if key_bounds is not None:
        kmin, kmax = key_bounds
        need = t // cfg.block_size   # complete blocks are read from them, the partial one from k
        for x in (kmin, kmax):
            if x.dim() != 4 or x.shape[0] < k.shape[0] or x.shape[1] != hkv or x.shape[2] < need or x.shape[3] != d:
                raise ValueError(f"key_bounds must be ({k.shape[0]}, {hkv}, >= {need}, {d}), got {tuple(x.shape)}")
            if x.device != k.device:
                raise ValueError(f"key_bounds must be on k's device ({k.device}), got {x.device}")
    if balls is not None:
        need = t // cfg.block_size
        if len(balls) != 4:
            raise ValueError("balls must be (key centres, key radii, value centres, value radii)")
        for i, x in enumerate(balls):
            want = 4 if i % 2 == 0 else 3
            if x.dim() != want or x.shape[0] < k.shape[0] or x.shape[1] != hkv or x.shape[2] < need \
                    or (want == 4 and x.shape[3] != d):
                shape = f"({k.shape[0]}, {hkv}, >= {need}" + (f", {d})" if want == 4 else ")")
                raise ValueError(f"balls[{i}] must be {shape}, got {tuple(x.shape)}")
            if x.device != k.device:
                raise ValueError(f"balls must be on k's device ({k.device}), got {x.device}")
    return b, hq, hkv, t, d


def check_row_values(pool_rows: int, t: int, lengths, starts=None, rows=None) -> None:
    """The values of decode_rows' per-row tensors (reads them: CPU and reference paths only):
    1 <= lengths <= T, 0 <= starts < lengths, 0 <= rows < pool rows."""
    lengths = torch.as_tensor(lengths)
    if bool((lengths < 1).any()) or bool((lengths > t).any()):
        raise ValueError(f"lengths must be in [1, {t}], got {lengths.tolist()}")
    if starts is not None:
        starts = torch.as_tensor(starts, device=lengths.device)
        if bool((starts < 0).any()) or bool((starts >= lengths).any()):
            raise ValueError(f"starts must be in [0, lengths), got {starts.tolist()} for lengths {lengths.tolist()}")
    if rows is not None:
        rows = torch.as_tensor(rows)
        if bool((rows < 0).any()) or bool((rows >= pool_rows).any()):
            raise ValueError(f"rows must be pool rows in [0, {pool_rows}), got {rows.tolist()}")


def quest_budget(n_blocks: int, quest_ratio: float) -> int | None:
    """The Quest policy's block budget for a row with `n_blocks` candidate blocks (None: no policy). The
    product is taken in double precision, as every kernel does, so all make the same choice."""
    if not quest_ratio:
        return None
    return max(1, math.ceil((1.0 - quest_ratio) * n_blocks))


def row_key_bounds(k_row: torch.Tensor, valid_row: torch.Tensor, kept, pool_row: int, block_size: int):
    """(kmin, kmax) (1, kv_heads, n_blocks, d) for one row: the kept summaries of its complete blocks (as
    the pool keeps them), the partial newest block summarised from its valid keys."""
    t = k_row.shape[2]
    complete, n_blocks = t // block_size, -(-t // block_size)
    kmin, kmax = (x[pool_row: pool_row + 1, :, :complete].float() for x in kept)
    if n_blocks > complete:
        tail = slice(complete * block_size, t)
        pmin, pmax = block_key_bounds(k_row[:, :, tail], valid_row[:, tail], block_size)
        kmin, kmax = torch.cat([kmin, pmin], 2), torch.cat([kmax, pmax], 2)
    return kmin, kmax


def decode_rows(q, k, v, cfg: ARTConfig, *, lengths, starts=None, rows=None, key_bounds=None,
                quest_ratio: float = 0.0, scale: float | None = None, balls=None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The oracle of `attention.kernels.dispatch.decode_rows` (see there): one `decode_attention` call
    per batch entry over its own pool row, positions [starts[i], lengths[i]), with that row's Quest
    budget. Slow and synchronising by design. Returns (out (b, hq, d), visited (b,), candidates (b,))."""
    b, hq, hkv, t, d = check_rows(q, k, v, cfg, lengths=lengths, starts=starts, rows=rows,
                                  key_bounds=key_bounds, quest_ratio=quest_ratio, balls=balls)
    check_row_values(k.shape[0], t, lengths, starts, rows)
    ends = torch.as_tensor(lengths).tolist()
    begins = torch.as_tensor(starts).tolist() if starts is not None else [0] * b
    pool_rows = torch.as_tensor(rows).tolist() if rows is not None else list(range(b))
    bs = cfg.block_size
    outs, visited, candidates = [], [], []
    for i, (r, start, end) in enumerate(zip(pool_rows, begins, ends)):
        k_row, v_row = k[r: r + 1, :, :end], v[r: r + 1, :, :end]
        valid = (torch.arange(end, device=k.device) >= start)[None, :]
        budget = quest_budget((end - 1) // bs - start // bs + 1, quest_ratio)
        bounds = None
        if key_bounds is not None and (cfg.uses_bounds or budget is not None):
            bounds = row_key_bounds(k_row, valid, key_bounds, r, bs)
        kept = None
        if balls is not None and (cfg.uses_ball or cfg.uses_values):   # the row's complete blocks
            kept = tuple(x[r: r + 1, :, : end // bs] for x in balls)
        out, stats = decode_attention(q[i: i + 1, :, None], k_row, v_row, cfg, key_padding_mask=valid, scale=scale,
                                      key_bounds=bounds, block_budget=budget, balls=kept)
        outs.append(out.view(hq, d))
        visited.append(stats.visited_blocks.sum())
        candidates.append(stats.candidate_blocks.sum())
    return torch.stack(outs), torch.stack(visited).to(q.device), torch.stack(candidates).to(q.device)

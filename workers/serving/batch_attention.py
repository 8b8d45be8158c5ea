"""Attention for one step of the continuous engine: decode rows and prefill chunks in one packed forward.

A step runs the model once on one packed sequence of tokens: one token for each decoding sequence, then
each prefill chunk's tokens (`position_ids` say where each token sits in its own sequence; the MLPs and
norms do not care which sequence a token belongs to). Attention is the only part that does, so the engine
registers `batch_attention` as a transformers attention implementation and runs the forward inside
`running(step)`, which hands every layer the step's plan (`StepBatch`; a context variable, since not
every model passes extra forward keywords down to its attention): each layer writes the new keys and values into the KV pool, attends
the decode rows over their slots (ART kernels per group of rows sharing ART settings, or one SDPA call
when ART is off for all) and each prefill chunk over its slot's prefix (SDPA, causal from its offset).

Everything per layer is device work on metadata prepared once per step (no host synchronisation per
layer); ART's block counts accumulate in device tensors the engine reads once per step.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attention import ARTConfig
from attention.kernels.dispatch import decode_rows, resolve
from workers.serving.kv_pool import KVPool

IMPLEMENTATION = "sparta_batch"
_STEP: ContextVar[StepBatch | None] = ContextVar("sparta_step", default=None)


@dataclass
class DecodeGroup:
    """Decode rows that share ART settings and a Quest ratio (one kernel call per layer)."""

    art: ARTConfig
    quest_ratio: float
    rows: list[int]                       # indices into the step's decode rows
    index: torch.Tensor | None = None     # the same on the device (None: every row, in order)


@dataclass
class PrefillChunk:
    """`length` prompt tokens of the sequence in `slot`, written at positions `start`.., taken from the
    packed input at `offset`."""

    slot: int
    start: int
    length: int
    offset: int


@dataclass
class StepBatch:
    """The plan of one step, as the attention function reads it (built by the engine, once per step)."""

    pool: KVPool
    decode_slots: list[int]               # pool slot of each decode row (0..n-1 under the pool's compaction)
    before: torch.Tensor                  # (layers, n) positions written this step (lengths before); host side
    groups: list[DecodeGroup]
    chunks: list[PrefillChunk]
    impl: str = "auto"
    block_size_off: int = 64              # how ART-off rows count their blocks
    # bounds to refresh after the writes: block size -> layer -> (slots, blocks) device tensors
    completed: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    visited: torch.Tensor | None = None   # (n,) int64, accumulated over layers
    candidates: torch.Tensor | None = None
    layer_calls: int = 0                  # attention layers that served this step (a host count)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.decode_slots)

    def __post_init__(self) -> None:
        dev = self.pool.device
        self.visited = torch.zeros(self.n, dtype=torch.long, device=dev)
        self.candidates = torch.zeros(self.n, dtype=torch.long, device=dev)
        self.slots_t = torch.tensor(self.decode_slots, dtype=torch.long, device=dev)
        self.contiguous = self.decode_slots == list(range(self.n))
        self.t_max = (self.before.amax(1) + 1).tolist() if self.n else []   # per layer, from the host copy
        self.before = self.before.to(dev)
        self.after = self.before + 1
        # ART off for every row and no kernel here (impl "reference", or the CPU kernel failed to build): one
        # SDPA call. Otherwise ART-off rows walk every block in the same kernel as the ART rows: exact, and
        # on a CPU several times faster than SDPA's decode path for a ragged batch.
        self.sdpa_off = resolve(self.impl, dev, self.block_size_off) == "reference" and all(
            not g.art.active and not g.quest_ratio for g in self.groups)

    # -- per-step values the layers share, made once ---------------------------------------------------
    def memo(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def starts(self, layer: int, window: int | None) -> torch.Tensor | None:
        if not window:
            return None
        return self.memo(("starts", layer, window), lambda: (self.after[layer] - window).clamp_min(0))

    def chunk_mask(self, chunk: PrefillChunk, window: int | None) -> torch.Tensor | None:
        """(length, start + length) bool: causal from the chunk's offset (and inside the window); None
        when plain is_causal does it (a chunk from position 0 with no window)."""
        if chunk.start == 0 and not window:
            return None

        def make():
            q = torch.arange(chunk.start, chunk.start + chunk.length, device=self.pool.device)[:, None]
            k = torch.arange(chunk.start + chunk.length, device=self.pool.device)[None, :]
            mask = k <= q
            return mask & (k > q - window) if window else mask
        return self.memo(("mask", chunk.slot, window), make)


def _write(step: StepBatch, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """The step's new keys and values into the pool: decode rows at their positions, chunks at their offsets."""
    pool = step.pool
    k_pool, v_pool = pool.k[layer], pool.v[layer]
    n = step.n
    if n:
        pos = step.before[layer]
        k_pool[step.slots_t, :, pos] = key[0, :, :n].transpose(0, 1)
        v_pool[step.slots_t, :, pos] = value[0, :, :n].transpose(0, 1)
    for c in step.chunks:
        k_pool[c.slot, :, c.start: c.start + c.length] = key[0, :, c.offset: c.offset + c.length]
        v_pool[c.slot, :, c.start: c.start + c.length] = value[0, :, c.offset: c.offset + c.length]
    for bs, per_layer in step.completed.items():
        if layer in per_layer and bs in pool.bounds:
            pool.summarise(layer, bs, *per_layer[layer])


def _blocks_off(step: StepBatch, layer: int, starts: torch.Tensor | None, kv_heads: int) -> torch.Tensor:
    """Blocks an ART-off row attends (every one holding a valid position), per row, times the KV heads."""
    bs = step.block_size_off
    last = (step.after[layer] + bs - 1) // bs
    first = starts // bs if starts is not None else 0
    return (last - first) * kv_heads


def _decode(step: StepBatch, layer: int, query: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """Attention of the n decode rows: (n, q_heads, d)."""
    pool, n = step.pool, step.n
    t = step.t_max[layer]
    k = pool.k[layer][:, :, :t]
    v = pool.v[layer][:, :, :t]
    q = query[0, :, :n].transpose(0, 1).contiguous()                  # (n, hq, d)
    lengths, starts = step.after[layer], step.starts(layer, window)
    hkv = k.shape[1]
    if step.sdpa_off and step.contiguous:
        pos = torch.arange(t, device=q.device)
        valid = pos[None, :] < lengths[:, None]
        if starts is not None:
            valid &= pos[None, :] >= starts[:, None]
        out = F.scaled_dot_product_attention(q[:, :, None], k[:n], v[:n], attn_mask=valid[:, None, None, :],
                                             scale=scale, enable_gqa=q.shape[1] != hkv)[:, :, 0]
        blocks = _blocks_off(step, layer, starts, hkv)
        step.visited += blocks
        step.candidates += blocks
        return out
    out = torch.empty_like(q)
    for g in step.groups:
        idx = g.index
        bounds = balls = None
        if g.art.uses_bounds or g.quest_ratio:
            bounds = pool.key_bounds(layer, g.art.block_size)
        if g.art.uses_ball or g.art.uses_values:
            balls = pool.block_balls(layer, g.art.block_size)
        rows = step.slots_t if idx is None else step.slots_t[idx]
        got, visited, candidates = decode_rows(
            q if idx is None else q[idx], k, v, g.art, lengths=lengths if idx is None else lengths[idx],
            starts=None if starts is None else (starts if idx is None else starts[idx]),
            rows=None if (idx is None and step.contiguous) else rows, key_bounds=bounds,
            quest_ratio=g.quest_ratio, scale=scale, impl=step.impl, balls=balls)
        if idx is None:
            out = got
            step.visited += visited
            step.candidates += candidates
        else:
            out[idx] = got
            step.visited.index_add_(0, idx, visited)
            step.candidates.index_add_(0, idx, candidates)
    return out


@contextmanager
def running(step: StepBatch):
    """Attention calls inside this block (this thread's) serve `step`."""
    token = _STEP.set(step)
    try:
        yield step
    finally:
        _STEP.reset(token)


def batch_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                    sliding_window=None, **kwargs):
    """A transformers attention implementation: inside `running(step)`, the continuous engine's packed step
    (query/key/value of shape (1, heads, tokens, d)); outside (a KV policy's whole-prompt prefill), stock SDPA."""
    sparta_step = _STEP.get()
    if sparta_step is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    step, layer = sparta_step, module.layer_idx
    step.layer_calls += 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = sliding_window or getattr(module, "sliding_window", None)
    _write(step, layer, key, value)
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])   # (tokens, q_heads, d)
    if step.n:
        out[: step.n] = _decode(step, layer, query, scale, window)
    pool = step.pool
    gqa = query.shape[1] != key.shape[1]
    for c in step.chunks:
        end = c.start + c.length
        q = query[:, :, c.offset: c.offset + c.length]
        mask = step.chunk_mask(c, window)
        got = F.scaled_dot_product_attention(
            q, pool.k[layer][c.slot: c.slot + 1, :, :end], pool.v[layer][c.slot: c.slot + 1, :, :end],
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa)
        out[c.offset: c.offset + c.length] = got[0].transpose(0, 1)
    return out[None], None


def register() -> None:
    """Make `batch_attention` available to transformers under IMPLEMENTATION (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, batch_attention)

"""A KV cache for decoding that appends in place.

transformers' `DynamicLayer` grows by `torch.cat`, copying the whole cache of a layer at every decode
step: at 4K tokens that copy costs about as much memory traffic as the attention that reads it, which
hides what ART saves. `GrowingLayer` keeps a buffer with spare room (amortised doubling) and hands out
views; anything that assigns `layer.keys` / `layer.values` directly (kvpress's presses after prefill)
is adopted, and the next append moves it into a fresh buffer.

It also keeps ART's per-block key summaries (channel-wise min and max, as Quest keeps them) up to date as
positions are appended, so certified mode and the Quest policy need not re-read the whole cache each step:
`key_bounds(keys, block_size)` finds the layer that owns a keys view handed to an attention function.
Likewise, when asked for them, the balls of complete blocks (centroid and radius of its keys and of its
values, as `attention.reference.block_balls` makes them) for box+ball score bounds and the value-aware
certificate: `block_balls(keys, values, block_size)`.
"""
from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from attention import reference


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose appends write into preallocated room instead of re-concatenating."""

    MIN_ROOM = 256   # positions of headroom added at least when the buffer is reallocated

    def __init__(self) -> None:
        self._kbuf = self._vbuf = None   # (batch, heads, capacity, dim) buffers, or None
        self._len = 0
        self._k = self._v = None         # tensors assigned from outside, not yet in a buffer
        self._bounds = None              # (block_size, summarised complete blocks, kmin, kmax)
        self._balls = {}                 # "keys"/"values" -> (block_size, summarised complete blocks, center, radius)
        super().__init__()

    # keys / values: views of the buffer, or whatever was assigned from outside
    @property
    def keys(self):
        return self._kbuf[:, :, : self._len] if self._kbuf is not None else self._k

    @keys.setter
    def keys(self, value):
        self._kbuf, self._k, self._bounds, self._balls = None, value, None, {}

    @property
    def values(self):
        return self._vbuf[:, :, : self._len] if self._vbuf is not None else self._v

    @values.setter
    def values(self, value):
        self._vbuf, self._v, self._balls = None, value, {}

    def _reserve(self, extra: int, like: torch.Tensor) -> None:
        keys, values = self.keys, self.values
        have = keys.shape[-2] if keys is not None and keys.dim() == 4 else 0
        if self._kbuf is not None and self._vbuf is not None and have + extra <= self._kbuf.shape[2]:
            return
        cap = max(2 * (have + extra), have + extra + self.MIN_ROOM)
        b, h, _, d = like.shape
        kbuf = like.new_empty(b, h, cap, d)
        vbuf = like.new_empty(b, h, cap, values.shape[-1] if have else d)
        if have:
            kbuf[:, :, :have] = keys
            vbuf[:, :, :have] = values
        self._kbuf, self._vbuf, self._k, self._v, self._len = kbuf, vbuf, None, None, have
        if len(_OWNERS) > 4096:   # forget buffers whose layer is gone
            for ptr in [p for p, r in _OWNERS.items() if r() is None]:
                del _OWNERS[ptr]
        _OWNERS[kbuf.data_ptr()] = weakref.ref(self)

    def update(self, key_states, value_states, cache_kwargs=None):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._reserve(n, key_states)
        self._kbuf[:, :, self._len : self._len + n] = key_states
        self._vbuf[:, :, self._len : self._len + n] = value_states
        self._len += n
        return self.keys, self.values

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.get_seq_length() - abs(max_length)
        if self._kbuf is not None and self.get_seq_length() > max_length:
            self._len, self._bounds, self._balls = max_length, None, {}
        else:
            super().crop(max_length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self.keys, self.values = (self.keys.repeat_interleave(repeats, 0),
                                      self.values.repeat_interleave(repeats, 0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.keys, self.values = self.keys[indices], self.values[indices]


    def block_key_bounds(self, block_size: int, partial: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(kmin, kmax, n): fp32 (batch, heads, room, dim) channel-wise min/max of the first n blocks of
        `block_size` positions: every block, the partial newest one included (recomputed each call), or
        with partial=False only the complete ones, each summarised once."""
        b, h, _, d = self._kbuf.shape
        n = self._len
        n_blocks = -(-n // block_size)
        bs_, done, kmin, kmax = self._bounds or (block_size, 0, None, None)
        if bs_ != block_size or kmin is None or kmin.shape[:2] != (b, h):
            done, kmin, kmax = 0, None, None
        if kmin is None or kmin.shape[2] < n_blocks:
            room = max(n_blocks, -(-self._kbuf.shape[2] // block_size))
            grown = [torch.empty(b, h, room, d, device=self._kbuf.device) for _ in range(2)]
            if kmin is not None:
                grown[0][:, :, :done], grown[1][:, :, :done] = kmin[:, :, :done], kmax[:, :, :done]
            kmin, kmax = grown
        full = n // block_size
        if full > done:
            blocks = self._kbuf[:, :, done * block_size: full * block_size].float().view(b, h, full - done, block_size, d)
            kmin[:, :, done:full], kmax[:, :, done:full] = blocks.amin(3), blocks.amax(3)
            done = full
        self._bounds = (block_size, done, kmin, kmax)
        if partial and n > full * block_size:   # the partial newest block changes every step: recomputed
            tail = self._kbuf[:, :, full * block_size: n].float()
            kmin[:, :, full], kmax[:, :, full] = tail.amin(2), tail.amax(2)
            return kmin, kmax, n_blocks
        return kmin, kmax, full


    def block_balls(self, block_size: int, keys: bool = True, values: bool = True) -> tuple:
        """(key centres, key radii, value centres, value radii, n): the balls of the first n = length //
        block_size (complete) blocks, fp32 (batch, heads, n, dim) and (batch, heads, n), each block
        summarised once by `attention.reference.block_balls` from its own keys or values (every position
        valid); None for the kind not asked for (keys / values False)."""
        n = self._len
        full = n // block_size
        out = []
        for kind, wanted, buf in (("keys", keys, self._kbuf), ("values", values, self._vbuf)):
            if not wanted:
                out += [None, None]
                continue
            b, h, _, d = buf.shape
            bs_, done, center, radius = self._balls.get(kind) or (block_size, 0, None, None)
            if bs_ != block_size or center is None or center.shape[:2] != (b, h) or center.shape[3] != d:
                done, center, radius = 0, None, None
            if center is None or center.shape[2] < full:
                room = max(full, buf.shape[2] // block_size)
                grown = (torch.empty(b, h, room, d, device=buf.device), torch.empty(b, h, room, device=buf.device))
                if center is not None:
                    grown[0][:, :, :done], grown[1][:, :, :done] = center[:, :, :done], radius[:, :, :done]
                center, radius = grown
            if full > done:
                span = slice(done * block_size, full * block_size)
                valid = torch.ones(b, (full - done) * block_size, dtype=torch.bool, device=buf.device)
                center[:, :, done:full], radius[:, :, done:full] = reference.block_balls(buf[:, :, span], valid,
                                                                                         block_size)
                done = full
            self._balls[kind] = (block_size, done, center, radius)
            out += [center[:, :, :full], radius[:, :, :full]]
        return (*out, full)


_OWNERS: dict[int, "weakref.ref[GrowingLayer]"] = {}   # buffer address -> the layer that owns it


def key_bounds(keys: torch.Tensor, block_size: int, partial: bool = True):
    """The kept per-block key summaries (kmin, kmax, blocks summarised) for `keys` if it is a
    `GrowingLayer`'s cache (as handed to an attention function), else None (the caller computes them
    from the keys). See `GrowingLayer.block_key_bounds`."""
    ref = _OWNERS.get(keys.data_ptr())
    layer = ref() if ref is not None else None
    if layer is None or layer._kbuf is None or layer._kbuf.data_ptr() != keys.data_ptr() \
            or layer._len != keys.shape[2] or layer._kbuf.shape[:2] != keys.shape[:2]:
        if ref is not None and layer is None:
            del _OWNERS[keys.data_ptr()]
        return None
    return layer.block_key_bounds(block_size, partial)


def block_balls(keys: torch.Tensor, values: torch.Tensor, block_size: int, want_keys: bool = True,
                want_values: bool = True):
    """The kept ball summaries (key centres, key radii, value centres, value radii, blocks summarised) of
    the complete blocks of `keys` / `values` if they are a `GrowingLayer`'s cache (as handed to an
    attention function), else None (the caller computes them from the cache). See
    `GrowingLayer.block_balls`."""
    ref = _OWNERS.get(keys.data_ptr())
    layer = ref() if ref is not None else None
    if layer is None or layer._kbuf is None or layer._kbuf.data_ptr() != keys.data_ptr() \
            or layer._len != keys.shape[2] or layer._kbuf.shape[:2] != keys.shape[:2] \
            or layer._vbuf is None or layer._vbuf.data_ptr() != values.data_ptr() or values.shape[2] != layer._len \
            or layer._vbuf.shape[:2] != values.shape[:2]:
        if ref is not None and layer is None:
            del _OWNERS[keys.data_ptr()]
        return None
    return layer.block_balls(block_size, want_keys, want_values)


def new_cache(model, growing: bool = True) -> DynamicCache:
    """A cache for `model`: a `DynamicCache` whose full-attention layers append in place (sliding-window
    layers keep transformers' own layer, which drops old positions)."""
    cache = DynamicCache(config=model.config)
    if growing:
        cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def tile_cache(cache: DynamicCache, batch: int, model) -> DynamicCache:
    """A new cache holding `batch` sequences taken round-robin from `cache`'s (for benchmarks that
    decode a bigger batch from fewer prefilled prompts)."""
    out = new_cache(model, growing=any(isinstance(layer, GrowingLayer) for layer in cache.layers))
    n = cache.layers[0].keys.shape[0]
    idx = torch.arange(batch) % n
    for src, dst in zip(cache.layers, out.layers):
        dst.update(src.keys[idx].contiguous(), src.values[idx].contiguous())
    return out

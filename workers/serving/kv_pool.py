"""The continuous engine's KV cache: preallocated once per replica, in slots of `capacity` positions.

Each running sequence owns a slot; per layer the pool holds keys and values of shape (slots, kv_heads,
capacity, head_dim), so the decode batch's rows are plain strided views that the ART kernels and SDPA read
without a copy: the scheduler keeps the decoding sequences in slots 0..n-1 (`move` compacts them when one
leaves), and a decode step reads `k[layer][:n, :, :T]`. Lengths are kept per layer and slot (a KV policy
such as PyramidKV leaves each layer its own length).

For ART's bound-ordered and certified modes the pool also keeps per-block key summaries (channel-wise min
and max, as Quest keeps them) for each block size in use, updated as blocks fill up, so the kernels never
re-read the whole cache to rank blocks; and, where a request's ART setting asks for them (box+ball score
bounds, the value-aware certificate), the balls of its blocks' keys and values (centroid and radius, as
`attention.reference.block_balls` makes them), likewise.
"""
from __future__ import annotations

import torch

from attention.reference import block_balls


class KVPool:
    """Keys, values and lengths of `slots` sequences of up to `capacity` positions, for every layer.
    One extra slot (index `slots`) is scratch space for swapping two sequences."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, slots: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        if slots < 1 or capacity < 1:
            raise ValueError(f"a KV pool needs at least one slot and one position, got {slots} x {capacity}")
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.slots, self.capacity, self.dtype, self.device = slots, capacity, dtype, device
        shape = (slots + 1, kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.lengths = torch.zeros(layers, slots + 1, dtype=torch.long)   # host side: the scheduler's bookkeeping
        self.bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # block size -> (kmin, kmax)
        # block size -> (key centres, key radii, value centres, value radii)
        self.balls: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def scratch(self) -> int:
        return self.slots

    @property
    def bytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.k)

    def used_tokens(self) -> int:
        """Positions held by live sequences (layer 0's lengths; scratch excluded)."""
        return int(self.lengths[0, : self.slots].sum())

    # -- sequences -----------------------------------------------------------------------------------
    def reset(self, slot: int) -> None:
        self.lengths[:, slot] = 0

    def move(self, src: int, dst: int) -> None:
        """Copy sequence `src` (its positions up to its longest layer, and its block summaries) to slot `dst`."""
        if src == dst:
            return
        n = int(self.lengths[:, src].max())
        for k, v in zip(self.k, self.v):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        for kept in [*self.bounds.values(), *self.balls.values()]:
            for x in kept:
                x[:, dst] = x[:, src]
        self.lengths[:, dst] = self.lengths[:, src]

    def load(self, slot: int, layer_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put a prefilled cache into `slot`: per layer (keys, values) of shape (1, kv_heads, n_layer, head_dim),
        as a KV policy left them; summaries of the complete blocks follow."""
        for layer, (keys, values) in enumerate(layer_kv):
            n = keys.shape[-2]
            if n > self.capacity:
                raise ValueError(f"layer {layer} holds {n} positions but a slot has {self.capacity}")
            self.k[layer][slot, :, :n] = keys[0]
            self.v[layer][slot, :, :n] = values[0]
            self.lengths[layer, slot] = n
        for bs in self.bounds:
            for layer in range(self.layers):
                blocks = int(self.lengths[layer, slot]) // bs
                if blocks:
                    self.summarise(layer, bs, torch.full((blocks,), slot, device=self.device),
                                   torch.arange(blocks, device=self.device))

    # -- block summaries -------------------------------------------------------------------------------
    def track_blocks(self, block_size: int, balls: bool = False) -> None:
        """Keep key summaries for `block_size` from now on (for sequences written after this call), and the
        key and value balls too if `balls`."""
        shape = (self.layers, self.slots + 1, self.kv_heads, max(1, self.capacity // block_size), self.head_dim)
        if block_size not in self.bounds:
            self.bounds[block_size] = (torch.zeros(shape, device=self.device), torch.zeros(shape, device=self.device))
        if balls and block_size not in self.balls:   # key centres, key radii, value centres, value radii
            self.balls[block_size] = tuple(torch.zeros(shape if i % 2 == 0 else shape[:-1], device=self.device)
                                           for i in range(4))

    def drop_blocks(self, keep: set[int], keep_balls: set[int] = frozenset()) -> None:
        """Forget the summaries of block sizes no running sequence uses, and the balls of those no running
        sequence needs balls of (memory is bounded by those in use)."""
        for bs in [bs for bs in self.bounds if bs not in keep]:
            del self.bounds[bs]
        for bs in [bs for bs in self.balls if bs not in keep_balls or bs not in self.bounds]:
            del self.balls[bs]

    def key_bounds(self, layer: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(kmin, kmax) of `layer`, (slots + 1, kv_heads, blocks, head_dim) fp32, covering every complete
        block of each sequence written since `track_blocks(block_size)`; None if not tracked."""
        got = self.bounds.get(block_size)
        return None if got is None else (got[0][layer], got[1][layer])

    def block_balls(self, layer: int, block_size: int) -> tuple[torch.Tensor, ...] | None:
        """(key centres, key radii, value centres, value radii) of `layer`, (slots + 1, kv_heads, blocks, head_dim)
        and (slots + 1, kv_heads, blocks) fp32, covering every complete block of each sequence written since
        `track_blocks(block_size, balls=True)`; None if not tracked."""
        got = self.balls.get(block_size)
        return None if got is None else tuple(x[layer] for x in got)

    def summarise(self, layer: int, block_size: int, slots: torch.Tensor, blocks: torch.Tensor) -> None:
        """Recompute the summaries of block `blocks[i]` of slot `slots[i]` (both device tensors of equal length)."""
        kmin, kmax = self.bounds[block_size]
        full = (self.capacity // block_size) * block_size
        view = self.k[layer][:, :, :full].unflatten(2, (-1, block_size))   # (slots, heads, blocks, bs, d)
        keys = view[slots, :, blocks].float()                                # (m, heads, bs, d)
        kmin[layer][slots, :, blocks] = keys.amin(2)
        kmax[layer][slots, :, blocks] = keys.amax(2)
        if block_size in self.balls:
            kc, kr, vc, vr = self.balls[block_size]
            values = self.v[layer][:, :, :full].unflatten(2, (-1, block_size))[slots, :, blocks]
            every = torch.ones(keys.shape[0], block_size, dtype=torch.bool, device=self.device)
            for x, center, radius in ((keys, kc, kr), (values, vc, vr)):
                c, r = block_balls(x, every, block_size)             # (m, heads, 1, d), (m, heads, 1)
                center[layer][slots, :, blocks] = c[:, :, 0]
                radius[layer][slots, :, blocks] = r[:, :, 0]

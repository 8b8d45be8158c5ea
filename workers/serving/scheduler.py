"""The continuous engine's scheduling decisions, in plain Python (no model, no tensors), so they can be
tested alone: which KV slot each sequence holds, how the decoding ones are kept in slots 0..n-1, and how a
step's prefill budget is shared among prompts waiting to be prefilled.
"""
from __future__ import annotations

from typing import Hashable, Protocol, TypeVar


class Occupant(Protocol):
    slot: int


T = TypeVar("T", bound=Occupant)
K = TypeVar("K", bound=Hashable)


class SlotTable:
    """Who holds each of `slots` KV slots. Slots are taken from the top (prefills) while the decoding
    sequences are compacted to the bottom, so the decode batch reads slots 0..n-1 as one view. `reserve`
    keeps slots aside for a request's later choices (n > 1), which are forked from its prefill."""

    SCRATCH = -1   # the pool's spare slot, for swaps

    def __init__(self, slots: int):
        self.owner: list[Occupant | None] = [None] * slots
        self.reserved = 0

    @property
    def slots(self) -> int:
        return len(self.owner)

    def free(self) -> int:
        """Slots neither held nor reserved."""
        return self.owner.count(None) - self.reserved

    def take(self, occupant: Occupant) -> int:
        """The highest empty slot for `occupant` (a reservation can be spent this way too)."""
        slot = max(i for i, o in enumerate(self.owner) if o is None)
        self.owner[slot] = occupant
        occupant.slot = slot
        return slot

    def release(self, occupant: Occupant) -> None:
        if self.owner[occupant.slot] is occupant:
            self.owner[occupant.slot] = None

    def compact(self, decoding: list[T]) -> list[tuple[int, int]]:
        """Moves (source slot, destination slot) that put every sequence of `decoding` into slots
        0..len-1 (in any order; those already there stay), applied in order. A slot in that range held by
        someone else (a prefilling sequence) trades places with the decoding sequence that moves in,
        through SCRATCH. Owners and their `slot` are updated."""
        n = len(decoding)
        ours = {id(s) for s in decoding}
        outside = [s for s in decoding if s.slot >= n]
        holes = [i for i in range(n) if self.owner[i] is None or id(self.owner[i]) not in ours]
        moves: list[tuple[int, int]] = []
        for hole, seq in zip(holes, outside):
            source, other = seq.slot, self.owner[hole]
            if other is None:
                moves.append((source, hole))
                self.owner[source] = None
            else:   # swap: the other sequence takes the slot the decoding one leaves
                moves += [(hole, self.SCRATCH), (source, hole), (self.SCRATCH, source)]
                self.owner[source] = other
                other.slot = source
            self.owner[hole] = seq
            seq.slot = hole
        return moves


def share_prefill(remaining: dict[K, int], budget: int) -> list[tuple[K, int]]:
    """Prompt tokens to prefill this step: (key, tokens), shortest remaining prompt first (a short request
    is not stuck behind a long prompt's prefill), each taking what it still needs until `budget` runs out."""
    out = []
    for key, need in sorted(remaining.items(), key=lambda kv: kv[1]):
        if budget <= 0:
            break
        take = min(need, budget)
        if take > 0:
            out.append((key, take))
            budget -= take
    return out

"""workers.serving.scheduler and workers.serving.kv_pool: slot bookkeeping, compaction moves, the prefill
budget, and the pool's data movement and block summaries."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attention.reference import block_balls, block_key_bounds
from workers.serving.kv_pool import KVPool
from workers.serving.scheduler import SlotTable, share_prefill


@dataclass(eq=False)
class Seq:
    name: str
    slot: int = -1


def apply(moves, contents: dict[int, str]) -> dict[int, str]:
    """What each slot holds after the moves (SCRATCH included), as the pool would copy them."""
    out = dict(contents)
    for src, dst in moves:
        out[dst] = out[src]
    return out


def test_slots_are_taken_from_the_top_and_reservations_count():
    table = SlotTable(4)
    a, b = Seq("a"), Seq("b")
    assert table.take(a) == 3 and table.take(b) == 2 and table.free() == 2
    table.reserved = 1
    assert table.free() == 1
    table.release(a)
    assert table.owner[3] is None and table.free() == 2


def test_compaction_moves_decoding_sequences_to_the_bottom_and_swaps_through_scratch():
    table = SlotTable(5)
    d1, d2, p1, d3 = Seq("d1"), Seq("d2"), Seq("p1"), Seq("d3")
    for seq, slot in ((d1, 0), (p1, 1), (d2, 3), (d3, 4)):
        table.owner[slot], seq.slot = seq, slot
    contents = {0: "d1", 1: "p1", 3: "d2", 4: "d3"}
    moves = table.compact([d1, d2, d3])
    after = apply(moves, contents)
    assert {s.slot for s in (d1, d2, d3)} == {0, 1, 2}
    for seq in (d1, d2, d3, p1):   # every sequence's data is where the table says it is
        assert after[seq.slot] == seq.name and table.owner[seq.slot] is seq
    assert p1.slot >= 3 and (SlotTable.SCRATCH, p1.slot) in moves   # the prefilling one traded places
    assert table.compact([d1, d2, d3]) == []   # already compact: nothing moves
    assert sum(o is None for o in table.owner) == 1


def test_the_prefill_budget_goes_to_the_shortest_remaining_prompt_first():
    assert share_prefill({"long": 4000, "short": 100, "mid": 300}, 256) == [("short", 100), ("mid", 156)]
    assert share_prefill({"a": 10, "b": 10}, 15) == [("a", 10), ("b", 5)]   # ties: arrival order
    assert share_prefill({"a": 10}, 0) == [] and share_prefill({}, 64) == []


def pool(slots=3, capacity=100, layers=2) -> KVPool:
    return KVPool(layers, 2, 8, slots, capacity, torch.float32, torch.device("cpu"))


def test_move_and_load_carry_keys_values_lengths_and_summaries():
    p = pool()
    p.track_blocks(16)
    keys = [torch.randn(1, 2, n, 8) for n in (40, 33)]   # two layers of different lengths (a PyramidKV cache)
    p.load(1, [(k, k * 2) for k in keys])
    assert p.lengths[:, 1].tolist() == [40, 33] and p.used_tokens() == 40
    p.move(1, 0)
    for layer, k in enumerate(keys):
        n = k.shape[2]
        assert torch.equal(p.k[layer][0, :, :n], k[0]) and torch.equal(p.v[layer][0, :, :n], 2 * k[0])
        kmin, kmax = p.key_bounds(layer, 16)
        full = n // 16
        want_min, want_max = block_key_bounds(k, torch.ones(1, n, dtype=torch.bool), 16)
        assert torch.equal(kmin[0, :, :full], want_min[0, :, :full]) and torch.equal(kmax[0, :, :full], want_max[0, :, :full])
    assert p.lengths[:, 0].tolist() == [40, 33]


def test_the_pool_keeps_key_and_value_balls_where_asked():
    p = pool()
    p.track_blocks(16, balls=True)
    p.track_blocks(8)   # bounds only
    keys = [torch.randn(1, 2, n, 8) for n in (40, 33)]
    p.load(2, [(k, k.flip(2) * 3) for k in keys])
    p.move(2, 1)
    assert p.block_balls(0, 8) is None and p.key_bounds(0, 8) is not None
    for layer, k in enumerate(keys):
        n, full = k.shape[2], k.shape[2] // 16
        every = torch.ones(1, n, dtype=torch.bool)
        kc, kr, vc, vr = p.block_balls(layer, 16)
        for (center, radius), x in (((kc, kr), k), ((vc, vr), k.flip(2) * 3)):
            want_c, want_r = block_balls(x, every, 16)   # summarised from the whole row: the same numbers
            assert torch.equal(center[1, :, :full], want_c[0, :, :full])
            assert torch.equal(radius[1, :, :full], want_r[0, :, :full])
            inside = (x[0, :, :16] - center[1, :, :1]).norm(dim=-1)
            assert (inside <= radius[1, :, :1]).all() and (radius[1, :, :full] > 0).all()
    # a later write into block 2 of slot 1 (layer 0), then its summary
    p.v[0][1, :, 32:48] = 5.0
    p.summarise(0, 16, torch.tensor([1]), torch.tensor([2]))
    _, _, vc, vr = p.block_balls(0, 16)
    assert torch.equal(vc[1, :, 2], torch.full((2, 8), 5.0)) and torch.equal(vr[1, :, 2], torch.zeros(2))
    p.drop_blocks({16, 8}, keep_balls=set())   # nobody needs balls: they go, the bounds stay
    assert p.block_balls(0, 16) is None and p.key_bounds(0, 16) is not None


def test_summarise_one_block_after_a_write():
    p = pool()
    p.track_blocks(8)
    p.k[0][2, :, :24] = torch.arange(2 * 24 * 8, dtype=torch.float32).view(2, 24, 8)
    p.summarise(0, 8, torch.tensor([2]), torch.tensor([1]))
    kmin, kmax = p.key_bounds(0, 8)
    assert torch.equal(kmin[2, :, 1], p.k[0][2, :, 8:16].amin(1)) and torch.equal(kmax[2, :, 1], p.k[0][2, :, 8:16].amax(1))
    assert p.key_bounds(0, 32) is None
    p.drop_blocks({16})
    assert p.key_bounds(0, 8) is None and math.isclose(p.bytes, 2 * 2 * 4 * 2 * 100 * 8 * 4)

"""Seeded draws: the column selectors of the sparse methods and the random A of the LoRA family.

Every draw comes from a CPU generator seeded by a stable hash of (run seed, module name, segment), so a
run seed reproduces every selector and factor, and layers and seeds differ. (Python's hash() is
salted per process, hence sha256.)
"""
from __future__ import annotations

import hashlib
import math

import torch


def generator(seed: int, name: str, segment: int = 0) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}|{name}|{segment}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def kaiming_a(rank: int, in_features: int, seed: int, name: str, segment: int) -> torch.Tensor:
    """LoRA's A init: Kaiming-uniform with a = sqrt(5), as nn.Linear and PEFT draw it."""
    a = torch.empty(rank, in_features)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator(seed, name, segment))
    return a


def columns(kind: str, in_features: int, rank: int, seed: int, name: str, segment: int) -> torch.Tensor:
    """Sorted indices of the r input columns selected in this segment (int64, CPU).

    first: columns [0, r). random: r distinct columns (same in every segment). window: the r-aligned
    window at offset (segment * r) mod m', m' = r * floor(m / r). random_window: the r-aligned windows in
    a seeded random order, walked cyclically. Columns beyond m' are never selected by the window kinds.
    """
    if kind == "first":
        return torch.arange(rank)
    if kind == "random":
        return torch.randperm(in_features, generator=generator(seed, name))[:rank].sort().values
    n_windows = in_features // rank
    if kind == "window":
        w = segment % n_windows
    elif kind == "random_window":
        w = int(torch.randperm(n_windows, generator=generator(seed, name))[segment % n_windows])
    else:
        raise ValueError(f"unknown selector kind {kind!r}")
    return torch.arange(w * rank, (w + 1) * rank)

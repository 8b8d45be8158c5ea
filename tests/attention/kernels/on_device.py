"""Where the Triton kernel's tests run it: compiled on a GPU where there is one, else on the CPU under
Triton's interpreter (tests/conftest.py). Inputs are made on the CPU, moved for the call and the results
moved back, so every test compares against the CPU reference unchanged on either machine."""
from __future__ import annotations

import dataclasses

import torch

from attention.reference import ARTStats

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def moved(x, device):
    """x with its tensors (also inside dicts, tuples, lists and `ARTStats`) on `device`."""
    if isinstance(x, torch.Tensor):
        if x._base is None:
            return x.to(device)
        # a view (of a KV pool, say) stays a view with its strides, so the kernel reads it as it would there
        base = x._base.to(device)
        return base.as_strided(x.shape, x.stride(), x.storage_offset() - x._base.storage_offset())
    if isinstance(x, dict):
        return {key: moved(y, device) for key, y in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(moved(y, device) for y in x)
    if isinstance(x, ARTStats):
        return ARTStats(*(moved(getattr(x, f.name), device) for f in dataclasses.fields(x)))
    return x


def on_device(fn, *args, **kwargs):
    """fn(*args, **kwargs) on DEVICE, its result back on the CPU."""
    return moved(fn(*moved(args, DEVICE), **moved(kwargs, DEVICE)), "cpu")

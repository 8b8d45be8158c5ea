"""`decode_attention` with a choice of implementation: the PyTorch reference (the oracle, any device),
the CPU kernel (attention/kernels/art_cpu.c) or the Triton kernel (GPU). All make the same decisions."""
from __future__ import annotations

import functools
import warnings

import torch

from attention import reference

IMPLS = ("auto", "reference", "cpu", "triton")


@functools.lru_cache(maxsize=None)
def _cpu_kernel_ok() -> bool:
    from attention.kernels import cpu as cpu_kernel

    try:
        cpu_kernel.library()
        return True
    except (RuntimeError, OSError) as e:
        warnings.warn(f"the CPU ART kernel is unavailable ({e}); using the PyTorch reference", stacklevel=3)
        return False


def resolve(impl: str, device: torch.device, block_size: int) -> str:
    """The implementation `impl` means for tensors on `device` ("auto": the fastest that runs there)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown ART implementation {impl!r}; valid: {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    if device.type == "cpu":
        return "cpu" if _cpu_kernel_ok() else "reference"
    if device.type == "cuda":
        from attention.kernels import triton_decode

        if triton_decode.triton is not None and block_size >= 16 and block_size & (block_size - 1) == 0:
            return "triton"
    return "reference"


def decode_attention(q, k, v, cfg, block_scores=None, *, impl: str = "auto", **kwargs):
    """Decode attention with ART (see `attention.reference.decode_attention` for the arguments).
    impl: "auto" (CPU kernel on CPU, Triton on CUDA, else the reference), or one of them by name."""
    name = resolve(impl, q.device, cfg.block_size)
    if name == "cpu":
        from attention.kernels.cpu import decode_attention_cpu

        return decode_attention_cpu(q, k, v, cfg, block_scores, **kwargs)
    if name == "triton":
        from attention.kernels.triton_decode import decode_attention_triton

        return decode_attention_triton(q, k, v, cfg, block_scores, **kwargs)
    return reference.decode_attention(q, k, v, cfg, block_scores, **kwargs)

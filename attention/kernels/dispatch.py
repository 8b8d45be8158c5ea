"""`decode_attention` and `decode_rows` with a choice of implementation: the PyTorch reference (the
oracle, any device), the CPU kernel (attention/kernels/art_cpu.c) or the Triton kernel (GPU). All make the
same decisions."""
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


@functools.lru_cache(maxsize=None)
def _triton_ok() -> bool:
    from attention.kernels import triton_decode

    if triton_decode.triton is None:   # said once: every layer of every step would repeat it
        warnings.warn("Triton is not installed: ART decode attention on CUDA falls back to the (slow) PyTorch "
                      "reference; pip install triton", stacklevel=3)
        return False
    return True


# The criteria each compiled kernel implements beyond stability and the mass certificate: "skip" (the
# comparator mode), "ball" (box+ball score bounds), "values" (the value-aware certificate). A config that
# needs one a kernel lacks runs on the reference under "auto", and is refused when that kernel is named.
KERNEL_FEATURES: dict[str, frozenset[str]] = {"cpu": frozenset({"skip", "ball", "values"}), "triton": frozenset({"skip", "ball", "values"})}


def features(cfg) -> set[str]:
    """The criteria `cfg` needs of a kernel (see KERNEL_FEATURES)."""
    if cfg is None or not cfg.active:
        return set()
    return {name for name, used in (("skip", cfg.mode == "skip"), ("ball", cfg.uses_ball),
                                    ("values", cfg.uses_values)) if used}


def resolve(impl: str, device: torch.device, block_size: int, cfg=None) -> str:
    """The implementation `impl` means for tensors on `device` ("auto": the fastest that runs there and
    implements what `cfg` needs). The Triton kernel takes any block size (it pads blocks inside), so on
    CUDA only a missing Triton or criterion falls back."""
    if impl not in IMPLS:
        raise ValueError(f"unknown ART implementation {impl!r}; valid: {', '.join(IMPLS)}")
    needs = features(cfg)
    if impl != "auto":
        missing = needs - KERNEL_FEATURES.get(impl, needs)
        if missing:
            raise ValueError(f"the {impl} ART kernel does not implement {', '.join(sorted(missing))} yet; "
                             "use impl 'reference' or 'auto'")
        return impl
    if device.type == "cpu":
        name = "cpu" if _cpu_kernel_ok() else "reference"
    elif device.type == "cuda" and _triton_ok():
        name = "triton"
    else:
        name = "reference"
    return name if needs <= KERNEL_FEATURES.get(name, needs) else "reference"


def decode_attention(q, k, v, cfg, block_scores=None, *, impl: str = "auto", **kwargs):
    """Decode attention with ART (see `attention.reference.decode_attention` for the arguments).
    impl: "auto" (CPU kernel on CPU, Triton on CUDA, else the reference), or one of them by name."""
    name = resolve(impl, q.device, cfg.block_size, cfg)
    if name == "cpu":
        from attention.kernels.cpu import decode_attention_cpu

        return decode_attention_cpu(q, k, v, cfg, block_scores, **kwargs)
    if name == "triton":
        from attention.kernels.triton_decode import decode_attention_triton

        return decode_attention_triton(q, k, v, cfg, block_scores, **kwargs)
    return reference.decode_attention(q, k, v, cfg, block_scores, **kwargs)


def decode_rows(q, k, v, cfg, *, lengths, starts=None, rows=None, key_bounds=None, quest_ratio: float = 0.0,
                scale: float | None = None, impl: str = "auto", balls=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode attention for a batch of rows of a preallocated KV pool, one query per row: the serving
    engine's call, once per layer and step.

    q: (b, q_heads, d), GQA when q_heads > kv_heads. k, v: (S, kv_heads, T, d) views of the pool (any
    strides with a contiguous head dim; never copied). rows: (b,) the pool row each query reads (None: row
    i). lengths: (b,) row i's valid positions end at lengths[i] (1 <= lengths[i] <= T); starts: (b,) where
    they begin (sliding windows; None: 0). key_bounds: None or the pool's (kmin, kmax) fp32
    (S, kv_heads, >= T // block_size, d) summaries of every *complete* block of each row (the partial newest
    block is summarised from k); without them, bounds are computed from k where needed. quest_ratio > 0:
    the Quest policy, each row keeping max(1, ceil((1 - ratio) * its candidate blocks)) blocks. balls: None
    or the pool's (key centres, key radii, value centres, value radii) fp32 of every complete block,
    (S, kv_heads, >= T // block_size, d) and (S, kv_heads, >= T // block_size), as
    `attention.reference.block_balls` makes them per block, for box+ball bounds and the value-aware
    certificate (only each row's first and last block are then summarised from k and v). cfg
    inactive: every candidate block is walked (ART-off rows of a mixed batch).

    Row i gives what `attention.reference.decode_attention` gives for q[i], pool row rows[i] sliced to
    lengths[i], key_padding_mask [starts[i], lengths[i]) and that row's Quest budget
    (`attention.reference.decode_rows` is that loop).

    Returns (out (b, q_heads, d) in q's dtype, visited (b,) int64, candidates (b,) int64): blocks summed
    over the KV heads of each row, on q's device. On CUDA (Triton) the call never makes the host wait for
    the device: read the statistics once per step.
    impl: "auto" (CPU kernel on CPU, Triton on CUDA), "cpu", "triton" or "reference".
    """
    name = resolve(impl, q.device, cfg.block_size, cfg)
    kwargs = dict(lengths=lengths, starts=starts, rows=rows, key_bounds=key_bounds, quest_ratio=quest_ratio,
                  scale=scale, balls=balls)
    if name == "cpu":
        from attention.kernels.cpu import decode_rows_cpu

        return decode_rows_cpu(q, k, v, cfg, **kwargs)
    if name == "triton":
        from attention.kernels.triton_decode import decode_rows_triton

        return decode_rows_triton(q, k, v, cfg, **kwargs)
    return reference.decode_rows(q, k, v, cfg, **kwargs)

"""The CPU ART decode kernel (attention/kernels/art_cpu.c): built once per machine with the system C compiler,
loaded with ctypes, called once per layer and decode step.

Why C and not torch ops: ART saves work only if skipped blocks are never read, so the stop check has to
sit inside the block loop; written as torch ops, every block costs a dozen dispatches per layer, which on
a CPU costs more than the attention it saves. The kernel makes the reference's decisions
(attention/reference.py, its oracle) and is tested against it.

The shared library is cached under $SPARTA_CACHE/kernels (default ~/.cache/sparta/kernels), keyed by the
source, the compiler and the CPU, since it is built with -march=native.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from attention.config import ARTConfig
from attention.reference import (ARTStats, check_row_values, check_rows, check_shapes, complete_balls, dense_off,
                                 dense_result, plan_walk, row_valid, rows_summaries, valid_positions,
                                 value_spread_from_balls)

SOURCE = Path(__file__).with_name("art_cpu.c")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class _Params(ctypes.Structure):
    """Mirror of `Params` in art_cpu.c (same order, same C types)."""
    _fields_ = [(n, ctypes.c_int32) for n in ("B", "HKV", "G", "T", "D", "NB", "BS", "dtype", "q_dtype")] + \
               [(n, ctypes.c_int64) for n in ("sk_b", "sk_h", "sk_t", "sv_b", "sv_h", "sv_t", "sb_b", "sb_h", "sb_j")] + \
               [(n, ctypes.c_int32) for n in ("mode", "patience", "min_blocks", "sink_tokens", "recent_blocks",
                                              "budget", "quest", "bounds_done", "nthreads", "order_bound")] + \
               [(n, ctypes.c_float) for n in ("tau", "phi", "eps", "scale")] + \
               [("quest_keep", ctypes.c_double), ("certificate", ctypes.c_int32)]

MODE_CODES = {"off": 0, "walk": 0, "stability": 1, "certified": 2, "skip": 3}   # the kernel's `mode`: 0 walks every candidate
CERTIFICATE_CODES = {"mass": 0, "relative": 1, "absolute": 2}
N_SUMMARIES = 5   # the trailing pointer arguments of both entry points: kc, kr, vmean, vspread, skip_log
ROWS_DONE = -1   # bounds_done meaning "each row's complete blocks" (its length // block_size)


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return "\n".join(sorted({line for line in info.splitlines() if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("the CPU ART kernel needs a C compiler (gcc or cc on PATH)")
    return cc


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """Compile (once per source/compiler/CPU) and load the kernel."""
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu_id()]).encode())
    root = Path(os.environ.get("SPARTA_CACHE") or Path.home() / ".cache" / "sparta").expanduser() / "kernels"
    target = root / f"art_cpu-{key.hexdigest()[:16]}.so"
    if not target.exists():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:   # build aside, rename into place: no torn reads
            built = Path(tmp) / target.name
            proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"building the CPU ART kernel failed:\n{proc.stderr}")
            os.replace(built, target)
    lib = ctypes.CDLL(str(target))
    lib.art_decode.restype = ctypes.c_int
    lib.art_decode.argtypes = [ctypes.POINTER(_Params)] + [ctypes.c_void_p] * (14 + N_SUMMARIES)
    lib.art_decode_rows.restype = ctypes.c_int
    lib.art_decode_rows.argtypes = [ctypes.POINTER(_Params)] + [ctypes.c_void_p] * (13 + N_SUMMARIES)
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _kernel_kv(k, v):
    """k, v as the kernel reads them: any strides with a contiguous head dim, float32/bfloat16/float16."""
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    if k.dtype not in DTYPES or v.dtype != k.dtype:
        k, v = k.float(), v.float()
    return k, v


def _kernel_bounds(key_bounds):
    """(kmin, kmax) as the kernel reads them: fp32, the head dim contiguous, both with the same strides
    (pool buffers pass as they are; anything else is copied)."""
    kmin, kmax = key_bounds
    if kmin.dtype != torch.float32 or kmax.dtype != torch.float32 or kmin.stride(-1) != 1 \
            or kmin.stride() != kmax.stride():
        kmin, kmax = kmin.float().contiguous(), kmax.float().contiguous()
    return kmin, kmax


def _params(q, k, v, cfg: ARTConfig, scale: float, mode: int, kmin=None, bounds_done: int = 0,
            block_budget: int | None = None, quest_ratio: float = 0.0) -> _Params:
    """The kernel's Params for q (batch, q_heads, d) against k, v (rows, kv_heads, T, d)."""
    b, hq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g, bs = hq // hkv, cfg.block_size
    if g > 64:
        raise ValueError(f"the CPU ART kernel supports up to 64 query heads per KV head, got {g}")
    sb = kmin.stride()[:3] if kmin is not None else (0, 0, 0)
    return _Params(B=b, HKV=hkv, G=g, T=t, D=d, NB=-(-t // bs), BS=bs, dtype=DTYPES[k.dtype], q_dtype=DTYPES[q.dtype],
                   sk_b=k.stride(0), sk_h=k.stride(1), sk_t=k.stride(2),
                   sv_b=v.stride(0), sv_h=v.stride(1), sv_t=v.stride(2), sb_b=sb[0], sb_h=sb[1], sb_j=sb[2],
                   mode=mode, patience=cfg.patience, min_blocks=cfg.min_blocks,
                   sink_tokens=cfg.sink_tokens, recent_blocks=cfg.recent_blocks, budget=block_budget or 0,
                   quest=quest_ratio > 0, bounds_done=bounds_done if kmin is not None else 0,
                   nthreads=torch.get_num_threads(), order_bound=cfg.active and cfg.order == "bound",
                   tau=cfg.tau, phi=cfg.phi, eps=cfg.eps, scale=scale, quest_keep=1.0 - quest_ratio,
                   certificate=CERTIFICATE_CODES[cfg.certificate])


def _summaries(k, v, cfg: ARTConfig, valid: torch.Tensor | None, rows=None, begins=None, ends=None,
               balls=None) -> tuple:
    """The per-batch-entry summaries the new criteria read, made with the reference's own functions so
    that the kernel sees bit for bit what the reference sees (None where `cfg` does not need them, so the
    other configurations pay nothing): (key centroids (b, hkv, nb, d), key radii (b, hkv, nb)) for box+ball
    bounds, (value mean (b, hkv, d), value spread (b, hkv, nb)) for the value-aware certificate, and the
    skip threshold ln(skip_lambda) - ln(valid positions) (b,) for skip mode, all fp32 contiguous.

    valid: (b, T) bool, or None: every position (batch form). rows/begins/ends: the pool form, batch entry
    i reading pool row rows[i] (None: i) over positions [begins[i], ends[i]).
    balls: None or kept (key centres, key radii, value centres, value radii): in the batch form, of the
    first complete blocks (see `attention.reference.complete_balls`); in the pool form, the pool's, of every
    complete block of each pool row (see `attention.reference.rows_balls`). Only the rest is summarised."""
    kc = kr = vmean = vspread = skip_log = None
    if not cfg.active or not (cfg.uses_ball or cfg.uses_values or cfg.mode == "skip"):
        return kc, kr, vmean, vspread, skip_log
    bs = cfg.block_size
    if ends is not None:   # the pool form: only the batch's rows are gathered, never the pool
        ends = ends.long()
        begins = torch.zeros_like(ends) if begins is None else begins.long()
        valid = row_valid(k.shape[2], begins, ends)
    elif valid is None:
        valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool)
    if cfg.uses_ball or cfg.uses_values:
        nb = math.ceil(k.shape[2] / bs)
        n_valid = F.pad(valid, (0, nb * bs - valid.shape[-1])).view(valid.shape[0], nb, bs).sum(-1)
        if ends is not None:
            picked = rows.long() if rows is not None else torch.arange(ends.shape[0])
            balls, values = rows_summaries(k, v, cfg, picked, begins, ends, n_valid, kept=balls)
        else:
            kept = balls
            balls = complete_balls(k, valid, bs, kept[:2] if kept else None) if cfg.uses_ball else None
            values = value_spread_from_balls(*complete_balls(v, valid, bs, kept[2:] if kept else None), n_valid) \
                if cfg.uses_values else None
        if balls is not None:
            kc, kr = (x.contiguous() for x in balls)
        if values is not None:
            vmean, vspread = (x.contiguous() for x in values)
    if cfg.mode == "skip":   # as plan_walk computes it
        skip_log = (math.log(cfg.skip_lambda) - torch.log(valid.sum(-1).float())).contiguous()
    return kc, kr, vmean, vspread, skip_log


def _launch(q, k, v, cfg: ARTConfig, scale: float, *, valid=None, block_scores=None, key_bounds=None, bounds_done=None,
            block_budget=None, order=None, want_mask=True, summaries=(None,) * N_SUMMARIES):
    """Run the kernel: (out (b, hq, d) in q's dtype, visited, candidates, reasons (b * hkv) int32, visited
    mask (b * hkv, nb) uint8 or None, totals [visited, candidates])."""
    b, hq, d = q.shape[0], q.shape[1], q.shape[-1]
    hkv, t = k.shape[1], k.shape[2]
    nb = -(-t // cfg.block_size)
    k, v = _kernel_kv(k, v)
    q = q.contiguous() if q.dtype in DTYPES else q.float().contiguous()
    kmin = kmax = None
    if key_bounds is not None:
        kmin, kmax = _kernel_bounds(key_bounds)
        done = nb if bounds_done is None else bounds_done
        if kmin.shape[:2] != (b, hkv) or kmin.shape[2] < done or kmin.shape[3] != d:
            raise ValueError(f"key_bounds must be ({b}, {hkv}, >= {done}, {d}), got {tuple(kmin.shape)}")
    out = torch.empty(b, hq, d, dtype=q.dtype)
    ints = torch.empty(3, b * hkv, dtype=torch.int32)
    totals = torch.empty(2, dtype=torch.int64)
    vmask = torch.zeros(b * hkv, nb, dtype=torch.uint8) if want_mask else None
    p = _params(q, k, v, cfg, scale, MODE_CODES[cfg.mode] if cfg.active else 0, kmin,
                nb if bounds_done is None else bounds_done, block_budget)
    return p, (q, k, v, valid, kmin, kmax, block_scores, order, out, ints, vmask, totals, summaries)


def _call(p, args):
    q, k, v, valid, kmin, kmax, scores, order, out, ints, vmask, totals, summaries = args
    rc = library().art_decode(ctypes.byref(p), _ptr(q), _ptr(k), _ptr(v), _ptr(valid), _ptr(kmin), _ptr(kmax),
                              _ptr(scores), _ptr(order), _ptr(out), _ptr(ints[0]), _ptr(ints[1]), _ptr(ints[2]),
                              _ptr(vmask), _ptr(totals), *(_ptr(x) for x in summaries))
    if rc:
        raise RuntimeError(f"the CPU ART kernel refused its arguments (code {rc})")


def decode_step(q, k, v, cfg: ARTConfig, scale: float, *, key_padding_mask=None, key_bounds=None,
                bounds_done: int | None = None, block_budget: int | None = None,
                balls=None) -> tuple[torch.Tensor, int, int]:
    """The lean call a decoder layer makes each step (ART active): (out (batch, 1, q_heads, d) in q's
    dtype, visited blocks, candidate blocks), no per-head stats. key_bounds may summarise only the first
    `bounds_done` blocks (the kernel summarises the rest from the keys); balls likewise the ball summaries
    of the first complete blocks (key centres, key radii, value centres, value radii; see
    `attention.reference.complete_balls`)."""
    b, hq, _, d = q.shape
    valid = None
    if key_padding_mask is not None:
        valid = key_padding_mask.to(torch.uint8).contiguous()
    summaries = _summaries(k, v, cfg, key_padding_mask.bool() if key_padding_mask is not None else None,
                           balls=balls)
    p, args = _launch(q.view(b, hq, d), k, v, cfg, scale, valid=valid, key_bounds=key_bounds,
                      bounds_done=bounds_done, block_budget=block_budget, want_mask=False, summaries=summaries)
    _call(p, args)
    visited, candidates = args[11].tolist()
    return args[8].view(b, 1, hq, d), visited, candidates


def decode_attention_cpu(q, k, v, cfg: ARTConfig, block_scores=None, *, key_padding_mask=None, lengths=None,
                         scale: float | None = None, key_bounds=None, block_budget: int | None = None,
                         order: torch.Tensor | None = None, balls=None) -> tuple[torch.Tensor, ARTStats]:
    """`decode_attention` with the CPU kernel; the same arguments and results.

    key_bounds: (kmin, kmax) as from `block_key_bounds`, or buffers with room for more blocks
    (batch, kv_heads, >= n_blocks, d) fp32 contiguous, as `attention.cache` keeps them; without them the
    kernel summarises the blocks from the keys itself when it needs them.
    order: (batch, kv_heads, n_blocks) visiting order to use instead of the kernel's own (tests).
    balls: kept ball summaries of the first complete blocks, as for `attention.reference.plan_walk`.
    """
    b, hq, hkv, t, d = check_shapes(q, k, v)
    if q.device.type != "cpu":
        raise ValueError(f"the CPU ART kernel runs on CPU tensors, got {q.device}")
    if block_budget is not None and (isinstance(block_budget, bool) or block_budget < 1):
        raise ValueError(f"block_budget must be a positive number of blocks, got {block_budget!r}")
    if not cfg.active and block_budget is None:
        return dense_off(q, k, v, cfg, key_padding_mask, lengths, scale)
    if not cfg.active:
        walk = plan_walk(q, k, v, cfg, block_scores, key_padding_mask, lengths, scale, None, block_budget)
        return dense_result(q, k, v, walk)
    bs = cfg.block_size
    nb = -(-t // bs)
    scale = d ** -0.5 if scale is None else scale
    valid = mask = None
    if key_padding_mask is not None or lengths is not None:
        mask = valid_positions(b, t, k.device, key_padding_mask, lengths)
        valid = mask.to(torch.uint8).contiguous()
    if block_scores is not None:
        if block_scores.shape != (b, hkv, nb):
            raise ValueError(f"block_scores must be ({b}, {hkv}, {nb}), got {tuple(block_scores.shape)}")
        block_scores = block_scores.float().contiguous()
    if order is not None:
        order = order.to(torch.int32).contiguous()
    p, args = _launch(q.reshape(b, hq, d), k, v, cfg, scale, valid=valid, block_scores=block_scores,
                      key_bounds=key_bounds if (cfg.uses_bounds or block_budget is not None) else None,
                      bounds_done=None if key_bounds is not None else 0,
                      block_budget=block_budget, order=order, summaries=_summaries(k, v, cfg, mask, balls=balls))
    _call(p, args)
    out, ints, vmask = args[8], args[9], args[10]
    stats = ARTStats(ints[0].view(b, hkv).long(), ints[1].view(b, hkv).long(), ints[2].view(b, hkv).long(),
                     vmask.view(b, hkv, nb).bool())
    return out.view(b, hq, 1, d), stats


def _row_ints(x: torch.Tensor | None, b: int, name: str) -> torch.Tensor | None:
    """A (b,) per-row integer tensor as the kernel reads it (int32, contiguous, on the CPU)."""
    if x is None:
        return None
    x = torch.as_tensor(x)
    if x.shape != (b,) or x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"{name} must be ({b},) integers, got {tuple(x.shape)} {x.dtype}")
    return x.to(torch.int32).contiguous()


def decode_rows_cpu(q, k, v, cfg: ARTConfig, *, lengths, starts=None, rows=None, key_bounds=None,
                    quest_ratio: float = 0.0, scale: float | None = None, balls=None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`attention.kernels.dispatch.decode_rows` with the CPU kernel (see there for the arguments): each
    batch entry reads its pool row in place through the strides of k and v (no copy of the pool), so the
    work is per batch entry, never per pool row. Returns (out (b, hq, d), visited (b,), candidates (b,))."""
    b, hq, hkv, t, d = check_rows(q, k, v, cfg, lengths=lengths, starts=starts, rows=rows, key_bounds=key_bounds,
                                  quest_ratio=quest_ratio, balls=balls)
    if q.device.type != "cpu":
        raise ValueError(f"the CPU ART kernel runs on CPU tensors, got {q.device}")
    lengths, starts, rows = (_row_ints(x, b, name) for x, name in ((lengths, "lengths"), (starts, "starts"),
                                                                   (rows, "rows")))
    check_row_values(k.shape[0], t, lengths, starts, rows)   # the kernel trusts them: no reads out of bounds
    scale = d ** -0.5 if scale is None else scale
    k, v = _kernel_kv(k, v)
    q = q.contiguous() if q.dtype in DTYPES else q.float().contiguous()
    kmin = kmax = None
    if key_bounds is not None and (cfg.uses_bounds or quest_ratio > 0):
        kmin, kmax = _kernel_bounds(key_bounds)
    p = _params(q, k, v, cfg, scale, MODE_CODES[cfg.mode] if cfg.active else 0, kmin, ROWS_DONE,
                quest_ratio=quest_ratio)
    summaries = _summaries(k, v, cfg, None, rows=rows, begins=starts, ends=lengths, balls=balls)
    out = torch.empty(b, hq, d, dtype=q.dtype)
    ints = torch.empty(3, b * hkv, dtype=torch.int32)
    totals = torch.empty(2, dtype=torch.int64)
    rc = library().art_decode_rows(ctypes.byref(p), _ptr(q), _ptr(k), _ptr(v), _ptr(rows), _ptr(starts),
                                   _ptr(lengths), _ptr(kmin), _ptr(kmax), _ptr(out), _ptr(ints[0]), _ptr(ints[1]),
                                   _ptr(ints[2]), _ptr(totals), *(_ptr(x) for x in summaries))
    if rc:
        raise RuntimeError(f"the CPU ART kernel refused its arguments (code {rc})")
    visited = ints[0].view(b, hkv).sum(-1, dtype=torch.int64)
    candidates = ints[1].view(b, hkv).sum(-1, dtype=torch.int64)
    return out, visited, candidates

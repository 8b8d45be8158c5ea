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
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from attention.config import ARTConfig
from attention.reference import ARTStats, check_shapes, dense_off, dense_result, plan_walk, valid_positions

SOURCE = Path(__file__).with_name("art_cpu.c")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class _Params(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("B", "HKV", "G", "T", "D", "NB", "BS", "dtype", "q_dtype")] + \
               [(n, ctypes.c_int64) for n in ("sk_b", "sk_h", "sk_t", "sv_b", "sv_h", "sv_t")] + \
               [(n, ctypes.c_int32) for n in ("mode", "patience", "min_blocks", "sink_tokens", "recent_blocks",
                                              "budget", "bound_cap", "bounds_done", "nthreads", "order_bound")] + \
               [(n, ctypes.c_float) for n in ("tau", "phi", "eps", "scale")]


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
    lib.art_decode.argtypes = [ctypes.POINTER(_Params)] + [ctypes.c_void_p] * 14
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _launch(q, k, v, cfg: ARTConfig, scale: float, *, valid=None, block_scores=None, key_bounds=None, bounds_done=None,
            block_budget=None, order=None, want_mask=True):
    """Run the kernel: (out (b, hq, d) in q's dtype, visited, candidates, reasons (b * hkv) int32, visited
    mask (b * hkv, nb) uint8 or None, totals [visited, candidates])."""
    b, hq, d = q.shape[0], q.shape[1], q.shape[-1]
    hkv, t = k.shape[1], k.shape[2]
    g, bs = hq // hkv, cfg.block_size
    nb = -(-t // bs)
    if g > 64:
        raise ValueError(f"the CPU ART kernel supports up to 64 query heads per KV head, got {g}")
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    if k.dtype not in DTYPES or v.dtype != k.dtype:
        k, v = k.float(), v.float()
    q = q.contiguous() if q.dtype in DTYPES else q.float().contiguous()
    kmin = kmax = None
    if key_bounds is not None:
        kmin, kmax = key_bounds
        if kmin.dtype != torch.float32 or not kmin.is_contiguous() or not kmax.is_contiguous():
            kmin, kmax = kmin.float().contiguous(), kmax.float().contiguous()
        done = nb if bounds_done is None else bounds_done
        if kmin.shape[:2] != (b, hkv) or kmin.shape[2] < done or kmin.shape[3] != d:
            raise ValueError(f"key_bounds must be ({b}, {hkv}, >= {done}, {d}), got {tuple(kmin.shape)}")
    out = torch.empty(b, hq, d, dtype=q.dtype)
    ints = torch.empty(3, b * hkv, dtype=torch.int32)
    totals = torch.empty(2, dtype=torch.int64)
    vmask = torch.zeros(b * hkv, nb, dtype=torch.uint8) if want_mask else None
    p = _Params(B=b, HKV=hkv, G=g, T=t, D=d, NB=nb, BS=bs, dtype=DTYPES[k.dtype], q_dtype=DTYPES[q.dtype],
                sk_b=k.stride(0), sk_h=k.stride(1), sk_t=k.stride(2),
                sv_b=v.stride(0), sv_h=v.stride(1), sv_t=v.stride(2),
                mode=1 if cfg.mode == "stability" else 2, patience=cfg.patience, min_blocks=cfg.min_blocks,
                sink_tokens=cfg.sink_tokens, recent_blocks=cfg.recent_blocks, budget=block_budget or 0,
                bound_cap=kmin.shape[2] if kmin is not None else 0,
                bounds_done=(nb if bounds_done is None else bounds_done) if kmin is not None else 0,
                nthreads=torch.get_num_threads(), order_bound=cfg.order == "bound", tau=cfg.tau, phi=cfg.phi,
                eps=cfg.eps, scale=scale)
    return p, (q, k, v, valid, kmin, kmax, block_scores, order, out, ints, vmask, totals)


def _call(p, args):
    q, k, v, valid, kmin, kmax, scores, order, out, ints, vmask, totals = args
    rc = library().art_decode(ctypes.byref(p), _ptr(q), _ptr(k), _ptr(v), _ptr(valid), _ptr(kmin), _ptr(kmax),
                              _ptr(scores), _ptr(order), _ptr(out), _ptr(ints[0]), _ptr(ints[1]), _ptr(ints[2]),
                              _ptr(vmask), _ptr(totals))
    if rc:
        raise RuntimeError(f"the CPU ART kernel refused its arguments (code {rc})")


def decode_step(q, k, v, cfg: ARTConfig, scale: float, *, key_padding_mask=None, key_bounds=None,
                bounds_done: int | None = None, block_budget: int | None = None) -> tuple[torch.Tensor, int, int]:
    """The lean call a decoder layer makes each step (ART active): (out (batch, 1, q_heads, d) in q's
    dtype, visited blocks, candidate blocks), no per-head stats. key_bounds may summarise only the first
    `bounds_done` blocks (the kernel summarises the rest from the keys)."""
    b, hq, _, d = q.shape
    valid = None
    if key_padding_mask is not None:
        valid = key_padding_mask.to(torch.uint8).contiguous()
    p, args = _launch(q.view(b, hq, d), k, v, cfg, scale, valid=valid, key_bounds=key_bounds,
                      bounds_done=bounds_done, block_budget=block_budget, want_mask=False)
    _call(p, args)
    visited, candidates = args[-1].tolist()
    return args[8].view(b, 1, hq, d), visited, candidates


def decode_attention_cpu(q, k, v, cfg: ARTConfig, block_scores=None, *, key_padding_mask=None, lengths=None,
                         scale: float | None = None, key_bounds=None, block_budget: int | None = None,
                         order: torch.Tensor | None = None) -> tuple[torch.Tensor, ARTStats]:
    """`decode_attention` with the CPU kernel; the same arguments and results.

    key_bounds: (kmin, kmax) as from `block_key_bounds`, or buffers with room for more blocks
    (batch, kv_heads, >= n_blocks, d) fp32 contiguous, as `attention.cache` keeps them; without them the
    kernel summarises the blocks from the keys itself when it needs them.
    order: (batch, kv_heads, n_blocks) visiting order to use instead of the kernel's own (tests).
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
    valid = None
    if key_padding_mask is not None or lengths is not None:
        valid = valid_positions(b, t, k.device, key_padding_mask, lengths).to(torch.uint8).contiguous()
    if block_scores is not None:
        if block_scores.shape != (b, hkv, nb):
            raise ValueError(f"block_scores must be ({b}, {hkv}, {nb}), got {tuple(block_scores.shape)}")
        block_scores = block_scores.float().contiguous()
    if order is not None:
        order = order.to(torch.int32).contiguous()
    p, args = _launch(q.reshape(b, hq, d), k, v, cfg, scale, valid=valid, block_scores=block_scores,
                      key_bounds=key_bounds if (cfg.uses_bounds or block_budget is not None) else None,
                      bounds_done=None if key_bounds is not None else 0,
                      block_budget=block_budget, order=order)
    _call(p, args)
    out, ints, vmask = args[8], args[9], args[10]
    stats = ARTStats(ints[0].view(b, hkv).long(), ints[1].view(b, hkv).long(), ints[2].view(b, hkv).long(),
                     vmask.view(b, hkv, nb).bool())
    return out.view(b, hq, 1, d), stats

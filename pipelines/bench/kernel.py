"""`sparta bench kernel`: decode attention alone, on the CPU or a GPU, side by side in one run.

Per (context, batch), one decode query per row against a KV cache of `context` positions, in the shape of
a model's attention (SmolLM2-135M's by default: 9 query heads over 3 KV heads of 64 channels). The keys
are synthetic but shaped like a trained LLM's scores: background scores of about one nat, attention sinks
`sink_nats` above them and a few recent positions `recent_nats` above; how much ART skips depends on
that shape, so the visited fraction is reported with every time (`sparta bench decode` measures it on a
real model). Rows, timed round-robin so drift hits them alike:
- `sdpa`: torch's scaled_dot_product_attention (GQA), what a user runs without sparta;
- `walk-all`: our kernel (`decode_rows`, Triton on CUDA, C on CPU) with termination off, every block
  visited: the kernel's own speed, and the cost of ART's checks when compared with a preset's row;
- one row per ART preset: the same kernel stopping early. Settings that rank or certify by per-block
  summaries (key min/max, key and value balls) read them as the serving engine's KV pool keeps them
  (`--summaries kept`, made once before timing) or make them in every call (`per-call`, as with a cache
  that keeps none); asking for both gives each preset a row of each.
Each row's error is ||o - o_exact|| / ||o_exact|| (worst row and head) against fp32 attention.
"""
from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable

import torch
import torch.nn.functional as F

from attention import ARTConfig
from attention.config import parse_art
from attention.kernels.dispatch import decode_rows, resolve
from attention.reference import block_balls, block_key_bounds
from pipelines.bench.common import ConfigError, Verdict, fmt
from workers.hardware import cpu_name, resolve_device

SDPA, WALK_ALL = "sdpa", "walk-all"
TARGET_VS_WALK_ALL = 1.10   # what skipping must gain over walking every block to count as paying
SHAPES = {"smollm2-135m": (9, 3, 64), "gemma3-270m": (4, 1, 256), "llama3-8b": (32, 8, 128)}
SUMMARIES = ("kept", "per-call")


@dataclass
class KernelBenchConfig:
    shape: str = "smollm2-135m"
    contexts: tuple[int, ...] = (4096, 16384)
    batches: tuple[int, ...] = (4, 16)
    art: tuple[str, ...] = ("tuned", "certified", "aggressive")
    device: str = "auto"
    dtype: str = "bfloat16"
    rounds: int = 3
    reps: int = 10
    sink_nats: float = 10.0
    recent_nats: float = 4.0
    seed: int = 0
    summaries: tuple[str, ...] = ("kept",)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ConfigError("shape", f"unknown shape {self.shape!r}; valid: {', '.join(SHAPES)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError("dtype", f"unknown dtype {self.dtype!r}; valid: float32, bfloat16")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("device", f"unknown device {self.device!r}; valid: auto, cpu, cuda")
        if resolve_device(self.device) == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", "cuda was asked for but no GPU is visible")
        for name in ("contexts", "batches"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ConfigError(name, "needs positive integers")
        if not self.summaries or any(x not in SUMMARIES for x in self.summaries):
            bad = next(x for x in self.summaries if x not in SUMMARIES) if self.summaries else ""
            raise ConfigError("summaries", f"unknown {bad!r}; valid: {', '.join(SUMMARIES)}")
        if self.rounds < 1 or self.reps < 1:
            raise ConfigError("rounds" if self.rounds < 1 else "reps", "must be >= 1")
        for label in self.art:
            try:
                parse_art(label)
            except ValueError as e:
                raise ConfigError("art", str(e)) from None

    def art_configs(self) -> list[tuple[str, ARTConfig]]:
        return [(label, parse_art(label)) for label in self.art]


@dataclass
class KernelRow:
    context: int
    batch: int
    row: str
    ms_p50: float
    ms_iqr: float
    visited: float          # fraction of the candidate blocks visited (1.0 for sdpa and walk-all)
    rel_error: float        # worst ||o - o_exact|| / ||o_exact|| over rows and heads
    vs_sdpa: float          # sdpa's time / this row's
    vs_walk_all: float      # walk-all's time / this row's


def synthetic_batch(batch: int, context: int, shape: str, dtype: torch.dtype, device: str, seed: int,
                    sink_nats: float, recent_nats: float):
    """(q (b, hq, d), k, v (b, hkv, T, d)) with scores as described in the module docstring."""
    hq, hkv, d = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    group = torch.randn(batch, hkv, 1, d, generator=g)          # the heads of a GQA group look alike
    q = group + 0.3 * torch.randn(batch, hkv, hq // hkv, d, generator=g)
    direction = group / group.norm(dim=-1, keepdim=True)
    nats = math.sqrt(d) / group.norm(dim=-1, keepdim=True)     # key length along `direction` per nat of score
    k = torch.randn(batch, hkv, context, d, generator=g) * (1.0 / math.sqrt(1.09))   # ~1 nat background
    k[:, :, :4] += sink_nats * nats * direction
    k[:, :, -8:] += recent_nats * nats * direction
    v = torch.randn(batch, hkv, context, d, generator=g)
    return (q.reshape(batch, hq, d).to(device, dtype), k.to(device, dtype), v.to(device, dtype))


def sdpa(q, k, v) -> torch.Tensor:
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def time_ms(fn: Callable[[], object], device: str, reps: int) -> list[float]:
    """Per-call milliseconds of `reps` calls (CUDA events on a GPU, the wall clock on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def rel_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((out.float() - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-30)).max())


def kept_summaries(k, v, art: ARTConfig) -> dict:
    """`decode_rows` keyword arguments holding the per-block summaries `art` reads, made once from the whole
    cache as the serving engine's KV pool keeps them (every block summarised from its own positions)."""
    every = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    out = {}
    if art.uses_bounds:
        out["key_bounds"] = tuple(x.contiguous() for x in block_key_bounds(k, every, art.block_size))
    if art.uses_ball or art.uses_values:
        out["balls"] = tuple(x.contiguous() for kv in (k, v) for x in block_balls(kv, every, art.block_size))
    return out


def run_cell(cfg: KernelBenchConfig, context: int, batch: int, device: str) -> list[KernelRow]:
    dtype = getattr(torch, cfg.dtype)
    q, k, v = synthetic_batch(batch, context, cfg.shape, dtype, device, cfg.seed + context + batch,
                              cfg.sink_nats, cfg.recent_nats)
    lengths = torch.full((batch,), context, dtype=torch.long, device=device)
    exact = sdpa(q.float(), k.float(), v.float())
    rows: dict[str, Callable[[], tuple]] = {SDPA: lambda: (sdpa(q, k, v), None, None)}
    rows[WALK_ALL] = lambda: decode_rows(q, k, v, ARTConfig(mode="off"), lengths=lengths)
    for label, art in cfg.art_configs():
        for how in cfg.summaries:
            name = label if len(cfg.summaries) == 1 else f"{label} [{how}]"
            kept = kept_summaries(k, v, art) if how == "kept" else {}
            rows[name] = (lambda art=art, kept=kept: decode_rows(q, k, v, art, lengths=lengths, **kept))
    outputs = {name: fn() for name, fn in rows.items()}   # also the warm-up (Triton compiles here)
    samples: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(cfg.rounds):
        for name, fn in rows.items():
            fn()
            samples[name] += time_ms(fn, device, cfg.reps)
    p50 = {name: statistics.median(xs) for name, xs in samples.items()}
    result = []
    for name, (out, visited, candidates) in outputs.items():
        seen = 1.0 if visited is None else float(visited.sum()) / max(1, int(candidates.sum()))
        q1, _, q3 = statistics.quantiles(samples[name], n=4) if len(samples[name]) > 1 else (0, 0, 0)
        result.append(KernelRow(context, batch, name, p50[name], q3 - q1, seen, rel_error(out, exact),
                                p50[SDPA] / p50[name], p50[WALK_ALL] / p50[name]))
    return result


def run(cfg: KernelBenchConfig, progress: Callable[[str, int, int], None] = lambda *a: None) -> list[KernelRow]:
    device = resolve_device(cfg.device)
    cells = [(c, b) for c in cfg.contexts for b in cfg.batches]
    rows: list[KernelRow] = []
    for i, (context, batch) in enumerate(cells):
        progress(f"context {context}, batch {batch}", i, len(cells))
        rows += run_cell(cfg, context, batch, device)
        if device == "cuda":
            torch.cuda.empty_cache()
    progress("done", len(cells), len(cells))
    return rows


def environment(cfg: KernelBenchConfig) -> dict:
    device = resolve_device(cfg.device)
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    return {"device": device, "device_name": name, "cpu": cpu_name(), "torch": torch.__version__,
            "kernel": resolve("auto", torch.device(device), 64), "threads": torch.get_num_threads(),
            "machine": platform.machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def verdicts(rows: list[KernelRow]) -> list[Verdict]:
    """Per ART preset, at the largest context and batch: does its skipping pay against the same kernel walking
    every block (>= TARGET_VS_WALK_ALL, beyond timing noise)? Its time against sdpa is shown beside."""
    context, batch = max(r.context for r in rows), max(r.batch for r in rows)
    out = []
    for r in rows:
        if r.context == context and r.batch == batch and r.row not in (SDPA, WALK_ALL):
            out.append(Verdict(f"{r.row} at {context} x {batch}: >= {TARGET_VS_WALK_ALL:.2f}x walk-all",
                               f"{r.vs_walk_all:.2f}x walk-all ({r.visited:.0%} visited), {r.vs_sdpa:.2f}x sdpa",
                               r.vs_walk_all >= TARGET_VS_WALK_ALL))
    return out


def table_rows(rows: list[KernelRow]) -> list[dict]:
    return [{"context": r.context, "batch": r.batch, "row": r.row, "ms p50": fmt(r.ms_p50, ".3f"),
             "IQR": fmt(r.ms_iqr, ".3f"), "visited": f"{r.visited:.0%}", "rel. error": f"{r.rel_error:.1e}",
             "vs sdpa": f"{r.vs_sdpa:.2f}x", "vs walk-all": f"{r.vs_walk_all:.2f}x"} for r in rows]


def record(cfg: KernelBenchConfig, rows: list[KernelRow]) -> dict:
    return {"config": asdict(cfg), "environment": environment(cfg), "rows": [asdict(r) for r in rows]}


def markdown(cfg: KernelBenchConfig, rows: list[KernelRow]) -> str:
    import pandas as pd

    from pipelines import tables
    from pipelines.bench.common import verdicts_markdown

    env = environment(cfg)
    head = (f"Decode attention, {cfg.shape} shape, {cfg.dtype}, on {env['device_name']} ({env['kernel']} kernel), "
            f"{env['date']}; synthetic scores (sinks +{cfg.sink_nats:g} nats, recent +{cfg.recent_nats:g}); "
            f"p50 of {cfg.rounds} x {cfg.reps} calls per row, round-robin.")
    return "\n\n".join([head, tables.markdown(pd.DataFrame(table_rows(rows)), {"row"}),
                        verdicts_markdown(verdicts(rows))])


def write(cfg: KernelBenchConfig, rows: list[KernelRow], out) -> dict:
    from pathlib import Path

    from pipelines.bench.common import write_report

    return write_report(Path(out), f"kernel-{resolve_device(cfg.device)}", [asdict(r) for r in rows],
                        markdown(cfg, rows), record(cfg, rows))


def print_report(console, cfg: KernelBenchConfig, rows: list[KernelRow]) -> None:
    import pandas as pd

    from pipelines import tables
    from pipelines.bench.common import verdicts_table

    env = environment(cfg)
    console.print(tables.rich_table(pd.DataFrame(table_rows(rows)), f"decode attention on {env['device_name']}",
                                    left={"row"}))
    console.print(verdicts_table(verdicts(rows), "targets"))

"""`sparta bench train`: what each adaptation method costs per training step, side by side.

Every row is built once (same weights, same synthetic batch), then the rows take steps round-robin so
machine drift hits them all alike. Two reference rows run in the same process: the floor (every base
weight frozen, no adapter, the head trained, gradients flowing through every layer: what any adapter
costs at least) and HF PEFT's LoRA at the same rank and targets (plus PEFT LoRA with A frozen).
"""
from __future__ import annotations

import csv
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from adapters import METHODS, AdapterConfig, apply
from adapters.targets import default_targets
from pipelines.bench.common import Verdict
from workers.data.assets import load_model
from workers.hardware import resolve_dtype

MiB = 2**20
SPARSE = ("cla", "r_cla", "c3la", "r_c3la")
FLOOR, PEFT_LORA, PEFT_FROZEN_A = "floor", "peft_lora", "peft_lora_frozen_A"


@dataclass
class BenchConfig:
    model: str = "minilm-l6"
    methods: tuple[str, ...] = tuple(METHODS)
    steps: int = 20
    warmup: int = 3
    batch: int = 16
    seq_len: int = 128
    rank: int = 16
    alpha: float | None = None
    lr: float = 1e-5
    num_labels: int = 4
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "auto"    # bf16 where the device runs it natively, else fp32 (workers.hardware)
    peft: bool = True
    seed: int = 0

    def __post_init__(self):
        self.dtype = resolve_dtype(self.dtype, self.device)


@dataclass
class Row:
    name: str
    model: nn.Module = field(repr=False)
    optimizer: torch.optim.Optimizer = field(repr=False)
    trainable: int
    times: list[float] = field(default_factory=list)
    saved_bytes: int = 0
    peak_bytes: int = 0

    @property
    def step_ms(self) -> float:
        return 1e3 * statistics.median(self.times)


@dataclass
class Result:
    name: str
    trainable: int
    step_ms: float
    step_ms_iqr: float
    saved_mib: float
    peak_mib: float
    overhead_ms: float = 0.0              # step time above the floor (median of same-round differences)
    overhead_vs_lora: float | None = None  # overhead / our lora's overhead
    adapter_saved_mib: float = 0.0        # saved for backward above the floor
    adapter_saved_vs_lora: float | None = None
    time_vs_peft: float | None = None
    peak_vs_peft: float | None = None


# -- building rows ---------------------------------------------------------------------------------
def _no_dropout(model: nn.Module) -> nn.Module:
    # Dropout masks are noise in a timing comparison and cost every row alike: switch them off.
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _fresh_model(cfg: BenchConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)   # the same classifier head in every row
    model, _ = load_model(cfg.model, task="classification", num_labels=cfg.num_labels,
                          dtype=getattr(torch, cfg.dtype))
    # Every row (floor, PEFT, ours) lets gradients reach the embeddings, so rows differ only by the
    # adapter: the floor needs it to backprop through every layer, and the others then do the same work.
    model.enable_input_require_grads()
    return _no_dropout(model).to(cfg.device).train()


def _optimizer(groups, lr) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, foreach=True)


def _trained(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_floor(cfg: BenchConfig) -> Row:
    model = _fresh_model(cfg)
    head = {id(p) for n, p in model.named_parameters() if n.split(".")[0] in ("classifier", "score")}
    for p in model.parameters():
        p.requires_grad_(id(p) in head)
    return Row(FLOOR, model, _optimizer(_trained(model), cfg.lr), trainable=0)


def build_peft(cfg: BenchConfig, freeze_a: bool) -> Row:
    from peft import LoraConfig, get_peft_model   # bench/dev dependency only

    model = _fresh_model(cfg)
    targets = [t.split(".")[-1] for t in default_targets(model)]
    if model.config.model_type == "gpt2":
        raise ValueError("PEFT adapts GPT-2's fused c_attn whole; no same-target reference row")
    peft_model = get_peft_model(model, LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha or 2 * cfg.rank, target_modules=targets, lora_dropout=0.0,
        task_type="SEQ_CLS"))
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    if freeze_a:
        for n, p in peft_model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    trainable = sum(p.numel() for p in lora if p.requires_grad)
    return Row(PEFT_FROZEN_A if freeze_a else PEFT_LORA, peft_model,
               _optimizer(_trained(peft_model), cfg.lr), trainable)


def build_method(cfg: BenchConfig, method: str) -> Row:
    model = _fresh_model(cfg)
    h = apply(model, AdapterConfig(method=method, rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed))
    return Row(method, model, _optimizer(h.param_groups(cfg.lr), cfg.lr), h.num_trainable())


def row_builders(cfg: BenchConfig) -> list[tuple[str, Callable[[], Row]]]:
    builders = [(FLOOR, lambda: build_floor(cfg))]
    if cfg.peft:
        builders += [(PEFT_LORA, lambda: build_peft(cfg, False)),
                     (PEFT_FROZEN_A, lambda: build_peft(cfg, True))]
    builders += [(m, lambda m=m: build_method(cfg, m)) for m in cfg.methods]
    return builders


# -- measuring -------------------------------------------------------------------------------------
def synthetic_batch(cfg: BenchConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    low = min(1000, vocab_size // 2)   # stay clear of special tokens
    return {
        "input_ids": torch.randint(low, vocab_size, (cfg.batch, cfg.seq_len), generator=g),
        "attention_mask": torch.ones(cfg.batch, cfg.seq_len, dtype=torch.long),
        "labels": torch.randint(0, cfg.num_labels, (cfg.batch,), generator=g),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(row: Row, batch: dict[str, torch.Tensor]) -> None:
    row.optimizer.zero_grad(set_to_none=True)
    row.model(**batch).loss.backward()
    row.optimizer.step()


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def saved_for_backward(row: Row, batch) -> int:
    """Bytes autograd saves for backward in one forward, weights excluded (activations only),
    each storage counted once."""
    weights = _storages([*row.model.parameters(), *row.model.buffers()])
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    row.optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = row.model(**batch).loss
    loss.backward()
    row.optimizer.zero_grad(set_to_none=True)
    return sum(saved.values())


def _resident_bytes(row: Row) -> int:
    tensors = [*row.model.parameters(), *row.model.buffers()]
    tensors += [p.grad for p in row.model.parameters() if p.grad is not None]
    tensors += [v for s in row.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(_storages(t for t in tensors if t.numel()).values())


def peak_memory(row: Row, batch, device: str) -> int:
    """Peak tensor memory of one training step, in bytes.

    CUDA: the allocator's max_memory_allocated. CPU: the tensors resident when the step starts
    (weights, optimizer state) plus the profiler's peak of allocated tensor memory during the step
    (the running sum of its allocation/free events).
    """
    row.optimizer.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step(row, batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.profiler import ProfilerActivity, profile

    resident = _resident_bytes(row)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(row, batch)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return resident + peak


@dataclass
class Report:
    config: BenchConfig
    results: list[Result]
    in_width: int   # m of the adapted layers (hidden size), for the r/m target


def run(cfg: BenchConfig, progress: Callable[[str, int, int], None] = lambda *a: None) -> Report:
    builders = row_builders(cfg)
    rows: list[Row] = []
    for i, (name, build) in enumerate(builders):
        progress(f"building {name}", i, len(builders))
        rows.append(build())
    vocab = rows[0].model.config.vocab_size
    batch = {k: v.to(cfg.device) for k, v in synthetic_batch(cfg, vocab).items()}
    total = (cfg.warmup + cfg.steps) * len(rows)
    for step in range(cfg.warmup + cfg.steps):
        for j, row in enumerate(rows):   # round-robin: drift hits every row alike
            progress(f"step {step + 1}/{cfg.warmup + cfg.steps}: {row.name}",
                     step * len(rows) + j, total)
            _sync(cfg.device)
            t0 = time.perf_counter()
            train_step(row, batch)
            _sync(cfg.device)
            if step >= cfg.warmup:
                row.times.append(time.perf_counter() - t0)
    for j, row in enumerate(rows):
        progress(f"memory: {row.name}", j, len(rows))
        row.saved_bytes = saved_for_backward(row, batch)
        row.peak_bytes = peak_memory(row, batch, cfg.device)
    return Report(cfg, summarize(rows), rows[0].model.config.hidden_size)


def _iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return 1e3 * (q[2] - q[0])


def summarize(rows: list[Row]) -> list[Result]:
    by = {r.name: r for r in rows}
    floor = by[FLOOR]
    lora = by.get("lora")
    peft = by.get(PEFT_LORA)
    lora_saved = lora.saved_bytes - floor.saved_bytes if lora else None

    def over_floor(r: Row) -> float:
        # Median of the per-round differences: each round runs every row back to back, so slow drift
        # of the machine cancels in the difference (far tighter than subtracting two medians).
        return 1e3 * statistics.median(a - b for a, b in zip(r.times, floor.times))

    lora_over = over_floor(lora) if lora else None
    out = []
    for r in rows:
        over = over_floor(r)
        saved_over = r.saved_bytes - floor.saved_bytes
        out.append(Result(
            name=r.name, trainable=r.trainable, step_ms=r.step_ms, step_ms_iqr=_iqr(r.times),
            saved_mib=r.saved_bytes / MiB, peak_mib=r.peak_bytes / MiB, overhead_ms=over,
            overhead_vs_lora=over / lora_over if lora_over and r.name != FLOOR else None,
            adapter_saved_mib=saved_over / MiB,
            adapter_saved_vs_lora=saved_over / lora_saved if lora_saved and r.name != FLOOR else None,
            time_vs_peft=r.step_ms / peft.step_ms if peft else None,
            peak_vs_peft=r.peak_bytes / peft.peak_bytes if peft else None,
        ))
    return out


# -- verdicts --------------------------------------------------------------------------------------
def verdicts(results: list[Result], rank: int, in_width: int) -> list[Verdict]:
    """The issue's targets, checked on this run's numbers."""
    by = {r.name: r for r in results}
    out: list[Verdict] = []
    lora, peft, frozen = by.get("lora"), by.get(PEFT_LORA), by.get(PEFT_FROZEN_A)
    for m in SPARSE:
        r = by.get(m)
        if r is None or lora is None:
            continue
        out.append(Verdict(f"{m}: time overhead over floor <= 0.3x lora's",
                           f"{r.overhead_ms:+.1f} ms vs lora {lora.overhead_ms:+.1f} ms "
                           f"({r.overhead_vs_lora:.2f}x)", r.overhead_vs_lora is not None
                           and r.overhead_vs_lora <= 0.3))
        out.append(Verdict(f"{m}: adapter activations saved <= r/m = {rank / in_width:.3f} of lora's",
                           f"{r.adapter_saved_mib:.2f} vs {lora.adapter_saved_mib:.2f} MiB "
                           f"({r.adapter_saved_vs_lora:.3f}x)", r.adapter_saved_vs_lora is not None
                           and r.adapter_saved_vs_lora <= rank / in_width))
        for ref in (peft, frozen):
            if ref is not None:
                out.append(Verdict(f"{m}: step time and peak memory <= {ref.name}",
                                   f"{r.step_ms:.0f} vs {ref.step_ms:.0f} ms, "
                                   f"{r.peak_mib:.0f} vs {ref.peak_mib:.0f} MiB",
                                   r.step_ms <= ref.step_ms and r.peak_mib <= ref.peak_mib))
    if lora is not None and peft is not None:
        out.append(Verdict("lora: within 5% of PEFT LoRA (time and peak memory)",
                           f"{lora.time_vs_peft:.3f}x time, {lora.peak_vs_peft:.3f}x memory",
                           lora.time_vs_peft <= 1.05 and lora.peak_vs_peft <= 1.05))
    return out


def sparse_vs_dense(results: list[Result]) -> list[tuple[str, float, float]]:
    """(pair, time ratio, peak ratio) for the parameter-matched pairs the paper compares."""
    by = {r.name: r for r in results}
    return [(f"{s}/{d}", by[s].step_ms / by[d].step_ms, by[s].peak_mib / by[d].peak_mib)
            for s, d in (("cla", "asym"), ("c3la", "rac")) if s in by and d in by]


# -- output ----------------------------------------------------------------------------------------
def environment(cfg: BenchConfig) -> dict:
    dev = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else platform.processor() or "cpu"
    return {"device": cfg.device, "device_name": dev, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "memory": "cuda max_memory_allocated" if cfg.device.startswith("cuda") else
            "resident tensors at step start + torch.profiler peak of allocated CPU tensor memory"}


def write_csv(path: Path, report: Report) -> None:
    results, cfg = report.results, report.config
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        w.writeheader()
        for r in results:
            w.writerow(asdict(r))
    meta = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "environment": environment(cfg)}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))

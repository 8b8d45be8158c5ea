"""`sparta bench serve --rates ... --adapters 8`: one merged adapter vs many adapters mixed in one batch.

The open-loop workload of `pipelines.bench.serve_open` (Poisson arrivals, seeded prompts and budgets, the same
requests for every configuration) is sent to two deployments, up at the same time and driven in turn, phase
by phase in snake order over every configuration (so that drift hits them alike):
- `merged`: a deployment of the spec with one LoRA adapter folded into the base (merge: true, no adapter work);
- one serving 2 x N adapters unmerged (N of each --adapter-methods, by default lora and the selector method
  cla), where `no adapter` sends every request to the base model (the reference inside this deployment),
  `<method> x1` every request to one adapter (the unmerged path's own cost), and
  `<method> xN` sends request i to adapter i mod N (N adapters mixed in every decode batch).
The adapters are generated here (random factors on the spec's base model; their values do not change the
work). Per (configuration, rate): output tokens/s, TTFT, TPOT and latency p50/p99, and ratios against `merged`
at the same rate. Output tokens/s compare capacity only where the server is saturated (served < offered):
the report says whether the highest rate was.
"""
from __future__ import annotations

import asyncio
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from pipelines import tables
from pipelines.bench.common import write_report
from pipelines.bench.serve import ConfigError, body, environment, essay_tokens, send, sigterm_as_ctrl_c, split, \
    tokenizer_for
from pipelines.bench.serve_open import (OpenLoopConfig, OpenSample, Steps, Workload, arrival_offsets,
                                        build_workload, open_loop, phase_plan, phase_row)
from pipelines.serving.local import Background, load_spec

TARGET = 0.8        # N mixed adapters >= this x the merged adapter's output tokens/s
MERGED = "merged"
BASE = "no adapter"   # the base model's name in the adapters' deployment: its rows add no adapter work


@dataclass(frozen=True)
class AdapterBenchConfig:
    spec: str
    rates: tuple[float, ...] = (0.5, 4.0)
    adapters: int = 8
    methods: tuple[str, ...] = ("lora", "cla")
    rank: int = 16
    requests: int = 32
    art: str = "off"
    prompt_tokens: tuple[int, ...] = (128, 512)
    max_tokens: tuple[int, ...] = (32, 64)
    rounds: int = 2
    seed: int = 0
    max_in_flight: int = 128
    port: int | None = None

    @property
    def labels(self) -> list[str]:
        """The unmerged deployment's configurations, in phase order."""
        return [BASE, f"{self.methods[0]} x1", *(f"{m} x{self.adapters}" for m in self.methods)]

    def open_loop(self) -> OpenLoopConfig:
        return OpenLoopConfig(spec=self.spec, rates=self.rates, requests=self.requests, art=(self.art,),
                              prompt_tokens=self.prompt_tokens, max_tokens=self.max_tokens, rounds=self.rounds,
                              seed=self.seed, max_in_flight=self.max_in_flight, probe_requests=1, port=self.port)


def check(cfg: AdapterBenchConfig):
    """Validate before anything is generated or deployed: the spec (as the open loop checks it, for one
    scheduler) and the adapter options. ConfigError naming the option, or ServeSpecError."""
    from adapters import METHODS
    from pipelines.bench import serve_open

    if cfg.adapters < 1:
        raise ConfigError("--adapters", f"give at least 1, got {cfg.adapters}")
    valid = [m for m, spec in METHODS.items() if spec.layer != "full"]
    if not cfg.methods or set(cfg.methods) - set(valid) or len(set(cfg.methods)) != len(cfg.methods):
        raise ConfigError("--adapter-methods", f"give distinct methods of {', '.join(valid)}, got {list(cfg.methods)}")
    if cfg.rank < 1:
        raise ConfigError("--adapter-rank", f"give at least 1, got {cfg.rank}")
    spec = load_spec(cfg.spec, cfg.port)
    if spec.adapters or spec.adapter or spec.model.startswith(("models:/", "runs:/")):
        raise ConfigError("--spec", "give a spec of a base model (no adapter, adapters or registry model): the "
                          "benchmark makes its own adapters")
    if len(cfg.methods) * cfg.adapters > 1024:
        raise ConfigError("--adapters", f"{len(cfg.methods)} x {cfg.adapters} adapters exceed 1024 per deployment")
    _, arts = serve_open.check(OpenLoopConfig(**{**asdict(cfg.open_loop()), "schedulers": (spec.scheduler.kind,)}))
    return spec, arts


def make_adapters(spec, cfg: AdapterBenchConfig, folder: Path) -> dict[str, list[Path]]:
    """N adapters per method on the spec's base model, with random factors: method -> folders."""
    import torch

    import adapters
    from workers.data.assets import load_model

    model, _ = load_model(spec.model, task="causal_lm", dtype=torch.float32, **spec.model_overrides)
    g = torch.Generator().manual_seed(cfg.seed)
    out: dict[str, list[Path]] = {}
    for method in cfg.methods:
        for i in range(cfg.adapters):
            handle = adapters.apply(model, adapters.AdapterConfig(method=method, rank=cfg.rank, seed=cfg.seed + i))
            with torch.no_grad():
                for p in handle.adapter_parameters():
                    p.copy_(0.01 * torch.randn(p.shape, generator=g))
            out.setdefault(method, []).append(handle.save(folder / f"{method}-{i}"))
            handle.unload()
    return out


def _other_port(port: int) -> int:
    """A free loopback port for the second deployment, other than `port`."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    return free if free != port else _other_port(port)


def derived_spec(spec_path: str, spec, entries: list[dict], merge: bool, folder: Path, name: str) -> Path:
    """The spec file as written, serving `entries` (adapter {uri, name}); model and tokenizer as validated
    (absolute folders), since the new file lies elsewhere."""
    data = yaml.safe_load(Path(spec_path).read_text())
    data.update(model=spec.model, adapters=entries, merge=merge, max_adapters=max(16, len(entries)),
                metrics_interval_s=0)
    if spec.tokenizer:
        data["tokenizer"] = spec.tokenizer
    if merge:   # requests name the merged model by its adapter's name
        data.pop("name", None)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def step_costs(spec, cfg: AdapterBenchConfig, made: dict[str, list[Path]], rows: int = 8,
               repeats: int = 20) -> list[dict]:
    """The adapters' own cost, in this process: one decode-like forward of `rows` single tokens (no KV, so the
    projections' work) with no adapter (what a merged model costs), every row on one adapter, and row i on
    adapter i mod N per method; rounds interleave the configurations, each timed `repeats` times, medians."""
    import time

    import numpy as np
    import torch

    from adapters.bank import AdapterBank, Routing
    from adapters.lowrank import read_factors
    from workers import hardware
    from workers.data.assets import load_model

    device = hardware.resolve_device(spec.device)
    dtype = getattr(torch, hardware.resolve_dtype(spec.dtype, torch.device(device)))
    model, _ = load_model(spec.model, task="causal_lm", dtype=dtype, **spec.model_overrides)
    model = model.to(device).eval()
    folders = [p for m in cfg.methods for p in made[m]]
    bank = AdapterBank(model, len(folders))
    for slot, folder in enumerate(folders):
        bank.put(slot, read_factors(folder, model)[1])
    first = {m: cfg.methods.index(m) * cfg.adapters for m in cfg.methods}
    configs = {BASE: Routing(), f"{cfg.methods[0]} x1": Routing.uniform(0),
               **{f"{m} x{cfg.adapters}": Routing.packed([(first[m] + i % cfg.adapters, i, 1) for i in range(rows)],
                                                       bank, device) for m in cfg.methods}}
    ids = torch.randint(10, 1000, (rows, 1), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    times: dict[str, list[float]] = {k: [] for k in configs}
    with torch.inference_mode():
        for _ in range(3):   # warm-up
            for routing in configs.values():
                with bank.route(routing):
                    model(input_ids=ids, use_cache=False)
        for r in range(repeats):
            for label in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
                with bank.route(configs[label]):
                    start = time.perf_counter()
                    model(input_ids=ids, use_cache=False)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times[label].append(time.perf_counter() - start)
    base = float(np.median(times[BASE]))
    return [{"config": k, "rows": rows, "step_ms": 1000 * float(np.median(v)),
             "vs_no_adapter": float(np.median(v)) / base, "adapter_ms": 1000 * (float(np.median(v)) - base)}
            for k, v in times.items()]


@dataclass
class AdapterReport:
    config: AdapterBenchConfig
    model: str
    rows: list[dict]
    verdicts: list[dict]
    samples: list[OpenSample]
    steps: list[dict] = field(default_factory=list)
    deployments: dict[str, dict] = field(default_factory=dict)
    environment: dict = field(default_factory=dict)


def run(cfg: AdapterBenchConfig, out: Path, progress=None, checked=None) -> AdapterReport:
    spec, arts = checked or check(cfg)
    art = arts[cfg.art]
    steps = Steps(progress, 4 + len(cfg.rates) * cfg.rounds * (1 + len(cfg.labels)))
    steps.show(f"making {len(cfg.methods)} x {cfg.adapters} adapters (rank {cfg.rank}) on {spec.model}")
    work = Path(tempfile.mkdtemp(prefix="sparta-bench-adapters-"))
    made = make_adapters(spec, cfg, work)
    steps.advance()
    steps.show("timing one decode step's adapter work in this process")
    costs = step_costs(spec, cfg, made)
    steps.advance()
    load = build_workload(cfg.open_loop(), essay_tokens(tokenizer_for(spec)))
    first = cfg.methods[0]
    names = {m: [f"{m}-{i}" for i in range(cfg.adapters)] for m in cfg.methods}
    routes = {MERGED: [MERGED], BASE: [spec.served_name], f"{first} x1": [names[first][0]],
              **{f"{m} x{cfg.adapters}": names[m] for m in cfg.methods}}
    plans = {   # deployment -> (its adapters, merged?, its port)
        MERGED: ([{"uri": str(made[first][0]), "name": MERGED}], True, spec.port),
        "adapters": ([{"uri": str(p), "name": n} for m in cfg.methods for p, n in zip(made[m], names[m])], False,
                     _other_port(spec.port)),
    }
    samples: list[OpenSample] = []
    deployments, servers = {}, {}
    with sigterm_as_ctrl_c():
        try:   # both up at once, idle in turn: every configuration sees the machine as the others do
            for name, (entries, merge, port) in plans.items():
                path = derived_spec(cfg.spec, spec, entries, merge, work, name)
                steps.show(f"{name}: deploying {len(entries)} adapter(s){' merged' if merge else ''} on port {port} "
                           f"(log: {out / f'serve-adapters-{name}.log'})")
                servers[name] = Background.start(path, work / f"{name}-state.json", out / f"serve-adapters-{name}.log",
                                                 port=port)
                deployments[name] = {"url": servers[name].url, "adapters": len(entries), "merge": merge}
                steps.advance()
            urls = {label: servers[MERGED if label == MERGED else "adapters"].url for label in routes}
            asyncio.run(_drive(urls, cfg, [MERGED, *cfg.labels], routes, art, load, steps, samples))
        finally:
            for name, server in servers.items():
                steps.show(f"{name}: stopping the deployment")
                server.stop()
    steps.show("done")
    rows = summarize(cfg, samples)
    return AdapterReport(cfg, spec.served_name, rows, verdicts(cfg, rows), samples, costs, deployments, environment())


async def _drive(urls: dict[str, str], cfg: AdapterBenchConfig, labels: list[str], routes: dict[str, list[str]], art,
                 load: Workload, steps: Steps, samples: list[OpenSample]) -> None:
    import httpx

    limits = httpx.Limits(max_connections=cfg.max_in_flight + 4, max_keepalive_connections=cfg.max_in_flight + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def send_one(request, sample):
            await send(client, urls[sample.scheduler], request, sample)   # OpenSample.scheduler: the configuration

        for label in labels:   # untimed: first-call costs hit no phase
            warm = OpenSample(label, cfg.art, 0.0, -1, 0, len(load.prompts[0]), 4)
            await send_one(body(routes[label][0], load.prompts[0], 4, art), warm)
            if not warm.ok:
                raise RuntimeError(f"the warm-up request ({label}) failed: {warm.status} {warm.error}")
        parts = split(cfg.requests, cfg.rounds)
        for rate, label, r in phase_plan(cfg.rates, tuple(labels), cfg.rounds):
            if r >= len(parts):
                continue
            title = f"{label}: {rate:g} req/s, round {r + 1}"
            steps.show(title)
            offsets = arrival_offsets(load.arrivals, rate)
            jobs = []
            for i in parts[r]:
                a = load.arrivals[i]
                # OpenSample.scheduler holds the configuration here
                sample = OpenSample(label, cfg.art, rate, r, i, a.prompt_tokens, a.max_tokens,
                                    arrival_s=offsets[i] - offsets[parts[r][0]])
                model = routes[label][i % len(routes[label])]
                jobs.append((body(model, load.prompts[i], a.max_tokens, art), sample))
            await open_loop(send_one, jobs, cfg.max_in_flight,
                            lambda n, t=title, total=len(jobs): steps.show(f"{t}: {n}/{total} answered"))
            samples += [s for _, s in jobs]
            steps.advance()


# -- the report ------------------------------------------------------------------------------------
def summarize(cfg: AdapterBenchConfig, samples: list[OpenSample]) -> list[dict]:
    """One row per (rate, configuration), merged first; ratios against merged at the same rate."""
    labels = [MERGED, *cfg.labels]
    rows = []
    for rate in sorted({s.rate for s in samples}):
        for label in labels:
            mine = [s for s in samples if (s.rate, s.scheduler) == (rate, label)]
            if mine:
                row = phase_row(rate, label, cfg.art, mine)
                row["config"] = row.pop("scheduler")
                rows.append(row)
    for row in rows:
        merged = next((r for r in rows if (r["rate"], r["config"]) == (row["rate"], MERGED)), None)
        for m in ("output_tokens_per_s", "tpot_p50_s", "ttft_p50_s", "latency_p99_s"):
            row[f"{m}_vs_merged"] = (row[m] / merged[m] if merged and merged is not row and row[m] and merged[m]
                                     else None)
    return rows


def verdicts(cfg: AdapterBenchConfig, rows: list[dict]) -> list[dict]:
    """At the highest rate: each method's N mixed adapters vs merged (the target), and each selector method
    vs the first (low-rank) one."""
    top = max(r["rate"] for r in rows)
    at = {r["config"]: r for r in rows if r["rate"] == top}
    out = []
    for m in cfg.methods:
        row = at.get(f"{m} x{cfg.adapters}")
        ratio = row and row["output_tokens_per_s_vs_merged"]
        out.append({"what": f"{m} x{cfg.adapters} vs merged, output tokens/s at {top:g} req/s", "ratio": ratio,
                    "target": f">= {TARGET:g}x", "met": None if ratio is None else ratio >= TARGET})
    base = at.get(BASE)
    for m in cfg.methods:   # against the base inside the same deployment: the adapters' own cost
        row = at.get(f"{m} x{cfg.adapters}")
        if row and base and row["output_tokens_per_s"] and base["output_tokens_per_s"]:
            out.append({"what": f"{m} x{cfg.adapters} vs {BASE} (same deployment), output tokens/s at {top:g} req/s",
                        "ratio": row["output_tokens_per_s"] / base["output_tokens_per_s"], "target": "-", "met": None})
    low = at.get(f"{cfg.methods[0]} x{cfg.adapters}")
    for m in cfg.methods[1:]:
        row = at.get(f"{m} x{cfg.adapters}")
        if row and low:
            out.append({"what": f"{m} x{cfg.adapters} vs {cfg.methods[0]} x{cfg.adapters}, TPOT p50 at {top:g} req/s",
                        "ratio": row["tpot_p50_s"] / low["tpot_p50_s"] if row["tpot_p50_s"] and low["tpot_p50_s"]
                        else None, "target": "-", "met": None})
    return out


COLUMNS = [("rate", "rate /s", "{:g}"), ("config", "configuration", "{}"), ("requests", "requests", "{}"),
           ("errors", "errors", "{}"), ("served_vs_offered", "served / offered", "{:.2f}"),
           ("output_tokens_per_s", "out tok/s", "{:.1f}"), ("ttft_p50_s", "TTFT p50 s", "{:.2f}"),
           ("ttft_p99_s", "TTFT p99 s", "{:.2f}"), ("tpot_p50_s", "TPOT p50 ms", "ms"),
           ("tpot_p99_s", "TPOT p99 ms", "ms"), ("latency_p99_s", "p99 s", "{:.2f}"),
           ("output_tokens_per_s_vs_merged", "tok/s vs merged", "{:.2f}x"),
           ("tpot_p50_s_vs_merged", "TPOT p50 vs merged", "{:.2f}x")]


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    return f"{1000 * value:.1f}" if fmt == "ms" else fmt.format(value)


def frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame([[_cell(r[k], f) for k, _, f in COLUMNS] for r in rows], columns=[h for _, h, _ in COLUMNS])


STEP_COLUMNS = [("config", "configuration", "{}"), ("rows", "rows", "{}"), ("step_ms", "forward ms", "{:.2f}"),
                ("adapter_ms", "adapter ms", "{:.2f}"), ("vs_no_adapter", "vs no adapter", "{:.2f}x")]


def step_frame(steps: list[dict]):
    import pandas as pd

    return pd.DataFrame([[_cell(r[k], f) for k, _, f in STEP_COLUMNS] for r in steps],
                        columns=[h for _, h, _ in STEP_COLUMNS])


def notes(report: AdapterReport) -> list[str]:
    out = []
    for v in report.verdicts:
        ratio = "-" if v["ratio"] is None else f"{v['ratio']:.2f}x"
        met = "" if v["met"] is None else f" (target {v['target']}: {'met' if v['met'] else 'not met'})"
        out.append(f"{v['what']}: {ratio}{met}")
    top = max(r["rate"] for r in report.rows)
    merged = next((r for r in report.rows if (r["rate"], r["config"]) == (top, MERGED)), None)
    if merged and (merged["served_vs_offered"] or 0) >= 0.95:
        out.append(f"merged kept up with {top:g} req/s (served / offered {merged['served_vs_offered']:.2f}): tokens/s "
                   "there measure the offered load, not capacity; raise --rates to saturate it")
    if report.steps:
        rows = report.steps[0]["rows"]
        out.append(f"forward ms: one forward of {rows} single tokens (no KV: the projections, where adapters work), "
                   "median; no adapter is what a merged adapter costs")
    out.append(f"{report.config.adapters} adapters per method, rank {report.config.rank}, random factors on "
               f"{report.model}; x1: every request to one adapter, x{report.config.adapters}: request i to adapter "
               f"i mod {report.config.adapters}; ART {report.config.art}")
    return out


def markdown(report: AdapterReport) -> str:
    parts = [tables.markdown(frame(report.rows), {"configuration"})]
    if report.steps:
        parts.append(tables.markdown(step_frame(report.steps), {"configuration"}))
    return "\n\n".join(parts + ["\n".join(f"- {n}" for n in notes(report))])


def print_report(console, report: AdapterReport) -> None:
    console.print(tables.rich_table(frame(report.rows), "sparta bench serve: merged vs many adapters",
                                    left={"configuration"}))
    if report.steps:
        console.print(tables.rich_table(step_frame(report.steps), "one decode step's forward, in-process",
                                        left={"configuration"}))
    for line in notes(report):
        console.print(line)


def write(report: AdapterReport, out: Path) -> dict[str, Path]:
    return write_report(out, "serve-adapters-" + report.model.replace(":", "_").replace("/", "_"), report.rows,
                        markdown(report), {"config": asdict(report.config), "model": report.model,
                                           "environment": report.environment, "deployments": report.deployments,
                                           "rows": report.rows, "verdicts": report.verdicts, "steps": report.steps,
                                           "samples": [asdict(s) for s in report.samples]})

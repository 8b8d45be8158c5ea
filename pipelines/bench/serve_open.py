"""`sparta bench serve --rates ...`: the open-loop mode, scheduler kinds and ART settings side by side.

Requests arrive as a Poisson process: at rate r the gaps between arrivals are exponential with mean 1/r,
and each request is sent at its arrival time whether or not earlier ones were answered (only a cap on
requests in flight, `--max-in-flight`, protects the client; a request that waited for it is counted as
capped). One seeded workload serves every configuration: request i has the same unit-mean gap, prompt
length, prompt text and max_tokens at every rate, scheduler kind and ART setting; a rate only scales the
gaps (request i arrives at offset_i / r), so every rate offers the same work, faster.

The spec is deployed once per scheduler kind (`sparta serve run --scheduler KIND`), one after the other;
within a deployment every (rate, ART setting) runs as `rounds` phases, in snake order over the whole run
(off on | on off | off on ...) so that drift hits the settings alike. Every request is a streamed, greedy
(temperature 0) `/v1/completions` with its ART setting in the `art` field.

Per (scheduler, ART, rate): output tokens/s are the answered output tokens over the wall time of the phases
(each from its first send to its last answer); TTFT is the time to the first streamed text; TPOT the time
per output token after the first, (latency - TTFT) / (tokens - 1); served / offered the answered requests/s
over the arrival rate the phases' draws offered. A configuration *sustains* a rate when, at that rate and at
every lower one, it answered every request, kept up with the arrivals (served / offered >= KEEP_UP: a
server that falls behind answers ever later, and its served rate stays below the offered one), and its p99
end-to-end latency stayed within SUSTAIN_P99_FACTOR x its p99 at the lowest rate. The report names the
highest rate static sustains, the highest continuous sustains, and the continuous / static output tokens/s
at the first rate static does not sustain (where both are measured: below it both serve what is offered,
so their tokens/s are equal by construction). Start --rates at a light load.

`--interference` adds a probe per deployment: the TTFT of short requests (PROBE_PROMPT tokens, PROBE_MAX
out) sent one at a time (unloaded), then each sent PROBE_DELAY_S after a long request (the longest
--prompt-tokens, the largest --max-tokens) so that it arrives while the long one is prefilled or decoded.
"""
from __future__ import annotations

import asyncio
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np
import pandas as pd

from pipelines import tables
from pipelines.bench.common import write_report
from pipelines.bench.serve import (ON, ConfigError, art_requests, body, cut, environment, essay_tokens, percentile,
                                   send, sigterm_as_ctrl_c, split, tokenizer_for)
from pipelines.serving.local import Background, load_spec, scheduler_kinds
from pipelines.serving.spec import ServeSpecError

SUSTAIN_P99_FACTOR = 2.0     # p99 latency within this multiple of the lowest rate's: the rate is sustained
KEEP_UP = 0.8                # served / offered below this: the server fell behind its arrivals
PROBE_PROMPT, PROBE_MAX = 128, 8   # the interference probe's short request
PROBE_DELAY_S = 0.1          # the short request follows the long one by this much (past a static batch's wait)
INTERFERENCE_TARGET = 2.0    # loaded TTFT p99 <= this x unloaded, with the continuous scheduler
SEND_LAG_NOTE_S = 0.05       # a phase whose sends ran later than this (p99) gets a note
LOAD, UNLOADED, LOADED, LONG = "load", "unloaded", "loaded", "long"   # OpenSample.kind


@dataclass(frozen=True)
class OpenLoopConfig:
    spec: str
    rates: tuple[float, ...] = (0.5, 1.0, 2.0)
    schedulers: tuple[str, ...] = ("continuous", "static")
    requests: int = 32
    art: tuple[str, ...] = ("off", ON)
    prompt_tokens: tuple[int, ...] = (128, 512, 1024, 2048)
    max_tokens: tuple[int, ...] = (16, 64, 128)
    rounds: int = 2
    seed: int = 0
    max_in_flight: int = 128
    interference: bool = False
    probe_requests: int = 8
    endpoint: str | None = None
    port: int | None = None


def check(cfg: OpenLoopConfig):
    """Validate everything before anything is deployed: ({scheduler kind: spec}, art values).
    ConfigError naming the option, or ServeSpecError."""
    if not cfg.rates or not all(math.isfinite(r) and r > 0 for r in cfg.rates):
        raise ConfigError("--rates", f"give positive request rates (requests/s), got {list(cfg.rates)}")
    if len(set(cfg.rates)) != len(cfg.rates):
        raise ConfigError("--rates", f"give distinct rates, got {list(cfg.rates)}")
    kinds = scheduler_kinds()
    if not cfg.schedulers or len(set(cfg.schedulers)) != len(cfg.schedulers) or set(cfg.schedulers) - set(kinds):
        raise ConfigError("--schedulers", f"give distinct kinds of {', '.join(kinds)}, got {','.join(cfg.schedulers)}")
    if cfg.endpoint and len(cfg.schedulers) > 1:
        raise ConfigError("--schedulers", "a running --endpoint has one scheduler kind: name it alone")
    for option, value in (("--requests", cfg.requests), ("--rounds", cfg.rounds),
                          ("--max-in-flight", cfg.max_in_flight), ("--probe-requests", cfg.probe_requests)):
        if value < 1:
            raise ConfigError(option, f"give at least 1, got {value}")
    spec = load_spec(cfg.spec, cfg.port)   # the spec as written: its errors as they are
    specs = {}
    for kind in cfg.schedulers:   # a spec may be valid for one kind only (static's batching limits)
        try:
            specs[kind] = load_spec(cfg.spec, cfg.port, kind)
        except ServeSpecError as e:
            raise ConfigError("--schedulers", f"the spec does not run with scheduler.kind {kind}: {e}") from None
    if not cfg.max_tokens or not all(1 <= m <= spec.max_new_tokens for m in cfg.max_tokens):
        raise ConfigError("--max-tokens", f"each must be in [1, {spec.max_new_tokens}] (the spec's max_new_tokens), "
                          f"got {list(cfg.max_tokens)}")
    longest = max(cfg.max_tokens)
    if not cfg.prompt_tokens:
        raise ConfigError("--prompt-tokens", "give at least one prompt length")
    for n in cfg.prompt_tokens:
        if n < 1 or n + longest > spec.max_context:
            raise ConfigError("--prompt-tokens", f"{n} + the largest max tokens {longest} must fit the spec's "
                              f"max_context {spec.max_context}")
    if cfg.interference and (PROBE_PROMPT + PROBE_MAX > spec.max_context or PROBE_MAX > spec.max_new_tokens):
        raise ConfigError("--interference", f"its short request ({PROBE_PROMPT} + {PROBE_MAX} tokens) does not fit "
                          f"the spec (max_context {spec.max_context}, max_new_tokens {spec.max_new_tokens})")
    return specs, art_requests(cfg, spec)


# -- the workload ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arrival:
    index: int
    gap: float            # unit-mean exponential: at rate r this request follows the previous one by gap / r
    prompt_tokens: int
    max_tokens: int
    prompt_start: float   # where its prompt starts in the essay tokens, as a fraction of them


def workload(n: int, prompt_tokens: tuple[int, ...], max_tokens: tuple[int, ...], seed: int) -> list[Arrival]:
    """`n` requests drawn from one seeded generator: gaps, prompt lengths and budgets (each uniformly
    from its list), prompt starts. Nothing depends on a rate, scheduler or ART setting."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0, n)
    lengths = rng.choice(np.asarray(prompt_tokens), n)
    budgets = rng.choice(np.asarray(max_tokens), n)
    starts = rng.random(n)
    return [Arrival(i, float(gaps[i]), int(lengths[i]), int(budgets[i]), float(starts[i])) for i in range(n)]


def arrival_offsets(arrivals: list[Arrival], rate: float) -> list[float]:
    """Seconds from the first arrival to each one at `rate` requests/s (the first gap is not waited for)."""
    offsets = np.concatenate([[0.0], np.cumsum([a.gap for a in arrivals[1:]])]) / rate
    return [float(x) for x in offsets]


def phase_plan(rates: tuple[float, ...], settings: tuple[str, ...], rounds: int) -> list[tuple[float, str, int]]:
    """(rate, setting, round) for one deployment: rates in the order given, each `rounds` times over the
    settings in snake order continued across rates (for two: off on, on off, off on, ...)."""
    plan = []
    for i, rate in enumerate(rates):
        for r in range(rounds):
            order = settings if (i * rounds + r) % 2 == 0 else settings[::-1]
            plan += [(rate, s, r) for s in order]
    return plan


# -- the client ------------------------------------------------------------------------------------
@dataclass
class OpenSample:
    scheduler: str
    art: str
    rate: float           # 0 for the interference probe
    round: int
    index: int
    prompt_tokens: int
    max_tokens: int
    kind: str = LOAD      # load, or the probe's unloaded / loaded / long requests
    arrival_s: float = 0.0   # when it was due, from its phase's start
    sent_s: float = 0.0      # when it went (later than due when the client cap held it back)
    done_s: float = 0.0      # when its answer ended (or failed)
    capped: bool = False
    ok: bool = False
    status: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    output_tokens: int = 0
    skipped_fraction: float | None = None
    replica: str = ""
    error: str = ""


Sender = Callable[[dict, OpenSample], Awaitable[object]]   # sends one request, filling in its sample


async def timed(send_one: Sender, request: dict, sample: OpenSample, start: float) -> None:
    sample.sent_s = time.perf_counter() - start
    try:
        await send_one(request, sample)
    finally:
        sample.done_s = time.perf_counter() - start


async def open_loop(send_one: Sender, jobs: list[tuple[dict, OpenSample]], max_in_flight: int,
                    answered: Callable[[int], None] | None = None) -> None:
    """Send each job at its sample's arrival_s (from now), never waiting for earlier answers, with at
    most `max_in_flight` unanswered at once (a job held back by that is marked capped)."""
    slots = asyncio.Semaphore(max_in_flight)
    start, tasks, done = time.perf_counter(), [], 0

    async def one(request, sample):
        nonlocal done
        try:
            await timed(send_one, request, sample, start)
        finally:
            slots.release()
            done += 1
            if answered:
                answered(done)

    for request, sample in sorted(jobs, key=lambda job: job[1].arrival_s):
        delay = start + sample.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sample.capped = slots.locked()
        await slots.acquire()
        tasks.append(asyncio.create_task(one(request, sample)))
    await asyncio.gather(*tasks)


async def probe_unloaded(send_one: Sender, short: list[dict], samples: list[OpenSample]) -> None:
    """The interference probe's first half: the short requests one at a time, nothing else in flight."""
    for request, sample in zip(short, samples):
        await timed(send_one, request, sample, time.perf_counter())


async def probe_loaded(send_one: Sender, short: list[dict], long: dict, samples: list[OpenSample],
                       longs: list[OpenSample]) -> None:
    """Its second half: each short request sent PROBE_DELAY_S after a long one (samples[i] and longs[i]
    share one clock), the next pair once both are answered."""
    for request, sample, busy in zip(short, samples, longs):
        start = time.perf_counter()
        background = asyncio.create_task(timed(send_one, long, busy, start))
        await asyncio.sleep(PROBE_DELAY_S)
        await timed(send_one, request, sample, start)
        await background


# -- the summary -----------------------------------------------------------------------------------
def tpot(s: OpenSample) -> float | None:
    """Seconds per output token after the first; None without a second token."""
    if not s.ok or s.ttft_s is None or s.output_tokens < 2:
        return None
    return (s.latency_s - s.ttft_s) / (s.output_tokens - 1)


def _phases(samples: list[OpenSample]) -> list[list[OpenSample]]:
    """The samples of each phase (scheduler, art, rate, round)."""
    phases: dict[tuple, list[OpenSample]] = {}
    for s in samples:
        phases.setdefault((s.scheduler, s.art, s.rate, s.round), []).append(s)
    return list(phases.values())


def _wall(samples: list[OpenSample]) -> float:
    """Sum over phases of first send to last answer."""
    return sum(max(s.done_s for s in p) - min(s.sent_s for s in p) for p in _phases(samples))


def offered_rate(samples: list[OpenSample], rate: float) -> float:
    """The arrival rate the phases' draws actually offered: (requests - 1) per phase over the time from its
    first to its last arrival (a few Poisson gaps stray far from 1 / rate); `rate` when no phase has two."""
    gaps = sum(len(p) - 1 for p in _phases(samples))
    span = sum(max(s.arrival_s for s in p) - min(s.arrival_s for s in p) for p in _phases(samples))
    return gaps / span if gaps and span > 0 else rate


def _ratio(a, b) -> float | None:
    return a / b if a and b else None


RATIO_METRICS = ("output_tokens_per_s", "ttft_p99_s", "tpot_p99_s", "latency_p99_s")


def summarize(samples: list[OpenSample]) -> list[dict]:
    """One row per (rate, scheduler, ART) of the load samples, rates ascending, kinds and settings in the
    order first seen; `*_vs_scheduler` ratios against static (same ART, rate), `*_vs_art` against off (else
    the first setting; same scheduler, rate); `sustained` by the rule in the module docstring."""
    load = [s for s in samples if s.kind == LOAD]
    kinds = list(dict.fromkeys(s.scheduler for s in load))
    settings = list(dict.fromkeys(s.art for s in load))
    keys = sorted({(s.rate, s.scheduler, s.art) for s in load},
                  key=lambda k: (k[0], kinds.index(k[1]), settings.index(k[2])))
    rows = [phase_row(rate, kind, art, [s for s in load if (s.rate, s.scheduler, s.art) == (rate, kind, art)])
            for rate, kind, art in keys]
    base_art = "off" if "off" in settings else settings[0] if settings else None
    for row in rows:
        static = _find(rows, row["rate"], "static", row["art"])
        base = _find(rows, row["rate"], row["scheduler"], base_art)
        for m in RATIO_METRICS:
            row[f"{m}_vs_scheduler"] = None if static in (None, row) else _ratio(row[m], static[m])
            row[f"{m}_vs_art"] = None if base in (None, row) else _ratio(row[m], base[m])
    mark_sustained(rows)
    return rows


def _find(rows: list[dict], rate: float, scheduler: str, art: str | None) -> dict | None:
    return next((r for r in rows if (r["rate"], r["scheduler"], r["art"]) == (rate, scheduler, art)), None)


def phase_row(rate: float, scheduler: str, art: str, mine: list[OpenSample]) -> dict:
    ok = [s for s in mine if s.ok]
    wall = _wall(mine)
    tokens = sum(s.output_tokens for s in ok)
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    tpots = [t for s in ok if (t := tpot(s)) is not None]
    lat = [s.latency_s for s in ok]
    skipped = [s.skipped_fraction for s in ok if s.skipped_fraction is not None]
    served, offered = (len(ok) / wall if wall > 0 else 0.0), offered_rate(mine, rate)
    return {"scheduler": scheduler, "art": art, "rate": rate, "requests": len(mine), "errors": len(mine) - len(ok),
            "rejected_503": sum(s.status == 503 for s in mine), "capped": sum(s.capped for s in mine),
            "wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "requests_per_s": served, "offered_requests_per_s": offered, "served_vs_offered": _ratio(served, offered),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "tpot_p50_s": percentile(tpots, 50), "tpot_p99_s": percentile(tpots, 99),
            "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
            "send_lag_p99_s": percentile([s.sent_s - s.arrival_s for s in mine], 99),
            "skipped_fraction": float(np.mean(skipped)) if skipped else None}


def mark_sustained(rows: list[dict]) -> None:
    """Set each row's `sustained`: per (scheduler, ART), rates ascending, a rate is sustained while every
    request so far was answered, served / offered >= KEEP_UP and p99 latency <= SUSTAIN_P99_FACTOR x the
    lowest rate's."""
    for kind, art in dict.fromkeys((r["scheduler"], r["art"]) for r in rows):
        mine = sorted((r for r in rows if (r["scheduler"], r["art"]) == (kind, art)), key=lambda r: r["rate"])
        reference, holding = mine[0]["latency_p99_s"], True
        for r in mine:
            p99 = r["latency_p99_s"]
            bounded = reference is not None and p99 is not None and p99 <= SUSTAIN_P99_FACTOR * reference
            kept_up = (r.get("served_vs_offered") or 0.0) >= KEEP_UP
            holding = holding and r["errors"] == 0 and bounded and kept_up
            r["sustained"] = holding


def static_sustains(rows: list[dict]) -> list[dict]:
    """Per ART setting: the highest rate the static scheduler sustains (None: not even the lowest), the
    continuous / static output tokens/s there, the highest rate continuous sustains, and the first rate
    static does not sustain with the continuous / static output tokens/s there (None where a row is missing)."""
    out = []
    for art in dict.fromkeys(r["art"] for r in rows if r["scheduler"] == "static"):
        static = sorted((r for r in rows if r["scheduler"] == "static" and r["art"] == art), key=lambda r: r["rate"])
        held = [r for r in static if r["sustained"]]
        top = held[-1] if held else None
        beyond = next((r for r in static if not r["sustained"]), None)
        continuous_held = [r["rate"] for r in rows if (r["scheduler"], r["art"]) == ("continuous", art) and r["sustained"]]

        def versus(row):
            continuous = _find(rows, row["rate"], "continuous", art) if row else None
            return _ratio(continuous["output_tokens_per_s"], row["output_tokens_per_s"]) if continuous else None

        out.append({"art": art, "rate": top["rate"] if top else None, "continuous_vs_static_tokens_per_s": versus(top),
                    "continuous_rate": max(continuous_held) if continuous_held else None,
                    "beyond_rate": beyond["rate"] if beyond else None,
                    "continuous_vs_static_tokens_per_s_beyond": versus(beyond)})
    return out


def probe_rows(samples: list[OpenSample]) -> list[dict]:
    """Per scheduler kind: the short requests' TTFT unloaded vs while a long request ran, and how many
    loaded ones overlapped the long one (were sent before it ended)."""
    rows = []
    for kind in dict.fromkeys(s.scheduler for s in samples if s.kind != LOAD):
        mine = [s for s in samples if s.scheduler == kind]
        unloaded = [s for s in mine if s.kind == UNLOADED]
        loaded = [s for s in mine if s.kind == LOADED]
        longs = {s.index: s for s in mine if s.kind == LONG}
        t_un = [s.ttft_s for s in unloaded if s.ok and s.ttft_s is not None]
        t_lo = [s.ttft_s for s in loaded if s.ok and s.ttft_s is not None]
        overlapped = sum(longs[s.index].done_s > s.sent_s for s in loaded)   # sent while the long one ran
        p99_un, p99_lo = percentile(t_un, 99), percentile(t_lo, 99)
        ratio = _ratio(p99_lo, p99_un)
        rows.append({"scheduler": kind, "art": unloaded[0].art if unloaded else None,
                     "short_prompt_tokens": PROBE_PROMPT,
                     "long_prompt_tokens": max((s.prompt_tokens for s in longs.values()), default=None),
                     "requests": len(loaded), "errors": sum(not s.ok for s in mine),
                     "unloaded_ttft_p50_s": percentile(t_un, 50), "unloaded_ttft_p99_s": p99_un,
                     "loaded_ttft_p50_s": percentile(t_lo, 50), "loaded_ttft_p99_s": p99_lo,
                     "loaded_vs_unloaded_p99": ratio, "overlapped": overlapped,
                     "target_met": None if ratio is None else ratio <= INTERFERENCE_TARGET})
    return rows


# -- the tables ------------------------------------------------------------------------------------
COLUMNS = [("rate", "rate /s", "{:g}"), ("scheduler", "scheduler", "{}"), ("art", "ART", "{}"),
           ("requests", "requests", "{}"), ("errors", "errors", "{}"), ("rejected_503", "503", "{}"),
           ("capped", "capped", "{}"), ("served_vs_offered", "served / offered", "{:.2f}"),
           ("output_tokens_per_s", "out tok/s", "{:.1f}"),
           ("ttft_p50_s", "TTFT p50 s", "{:.2f}"), ("ttft_p99_s", "TTFT p99 s", "{:.2f}"),
           ("tpot_p50_s", "TPOT p50 ms", "ms"), ("tpot_p99_s", "TPOT p99 ms", "ms"),
           ("latency_p50_s", "p50 s", "{:.2f}"), ("latency_p99_s", "p99 s", "{:.2f}"),
           ("sustained", "sustained", "yes/no"),
           ("output_tokens_per_s_vs_scheduler", "tok/s vs static", "{:.2f}x"),
           ("ttft_p99_s_vs_scheduler", "TTFT p99 vs static", "{:.2f}x"),
           ("latency_p99_s_vs_scheduler", "p99 vs static", "{:.2f}x"),
           ("output_tokens_per_s_vs_art", "tok/s vs off", "{:.2f}x"), ("latency_p99_s_vs_art", "p99 vs off", "{:.2f}x")]
PROBE_COLUMNS = [("scheduler", "scheduler", "{}"), ("art", "ART", "{}"), ("short_prompt_tokens", "short prompt", "{}"),
                 ("long_prompt_tokens", "long prompt", "{}"), ("requests", "requests", "{}"),
                 ("errors", "errors", "{}"), ("overlapped", "overlapped", "{}"),
                 ("unloaded_ttft_p50_s", "unloaded TTFT p50 s", "{:.3f}"),
                 ("unloaded_ttft_p99_s", "unloaded TTFT p99 s", "{:.3f}"),
                 ("loaded_ttft_p50_s", "loaded TTFT p50 s", "{:.3f}"),
                 ("loaded_ttft_p99_s", "loaded TTFT p99 s", "{:.3f}"),
                 ("loaded_vs_unloaded_p99", "p99 loaded / unloaded", "{:.2f}x"),
                 ("target_met", f"<= {INTERFERENCE_TARGET:g}x", "yes/no")]


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "ms":
        return f"{1000 * value:.1f}"
    if fmt == "yes/no":
        return "yes" if value else "no"
    return fmt.format(value)


def frame(rows: list[dict], columns=COLUMNS, base_art: str = "off") -> pd.DataFrame:
    return pd.DataFrame([[_cell(r[k], fmt) for k, _, fmt in columns] for r in rows],
                        columns=[h.replace("vs off", f"vs {base_art}") for _, h, _ in columns])


def notes(report: "OpenReport") -> list[str]:
    """The lines under the tables: the sustain rule's verdicts, the client cap, the probe's target."""
    out = []
    for s in report.sustains:
        if s["rate"] is None:
            out.append(f"ART {s['art']}: static sustains none of the rates (the lowest had errors)")
        else:
            ratio = s["continuous_vs_static_tokens_per_s"]
            out.append(f"ART {s['art']}: static sustains up to {s['rate']:g} req/s"
                       + (f"; continuous / static output tokens/s there: {ratio:.2f}x" if ratio else ""))
        if s.get("continuous_rate") is not None:
            out.append(f"ART {s['art']}: continuous sustains up to {s['continuous_rate']:g} req/s")
        if s.get("beyond_rate") is not None and s.get("continuous_vs_static_tokens_per_s_beyond"):
            out.append(f"ART {s['art']}: at {s['beyond_rate']:g} req/s, the first rate static does not sustain, "
                       f"continuous / static output tokens/s: {s['continuous_vs_static_tokens_per_s_beyond']:.2f}x")
    out.append(f"sustained: every request answered at this rate and below, served / offered >= {KEEP_UP:g}, and p99 "
               f"latency <= {SUSTAIN_P99_FACTOR:g}x the lowest rate's (same scheduler and ART)")
    for kind, art in dict.fromkeys((r["scheduler"], r["art"]) for r in report.rows):
        lowest = min((r for r in report.rows if (r["scheduler"], r["art"]) == (kind, art)), key=lambda r: r["rate"])
        if (lowest["served_vs_offered"] or 0.0) < KEEP_UP:
            out.append(f"{kind}, ART {art}: the lowest rate ({lowest['rate']:g}/s) answered "
                       f"{lowest['served_vs_offered'] or 0:.2f}x its arrival rate: no light load, so nothing is "
                       "sustained (lower --rates)")
    for kind, d in report.deployments.items():
        said = d.get("healthz", {}).get("scheduler")
        if said is not None and said != kind:
            out.append(f"the {kind} deployment reported scheduler {said!r} on /healthz: its rows are not {kind}'s")
    capped = sum(r["capped"] for r in report.rows)
    if capped:
        out.append(f"the client cap (--max-in-flight {report.config.max_in_flight}) held back {capped} requests: "
                   "their rates were not offered in full")
    lag = max((r["send_lag_p99_s"] or 0.0 for r in report.rows), default=0.0)
    if lag > SEND_LAG_NOTE_S:   # the client shares the CPUs with the server
        out.append(f"the client sent requests up to {lag:.2f} s late (p99 of a phase): arrivals were not quite Poisson")
    for p in report.probe:
        if p["overlapped"] < p["requests"]:
            out.append(f"interference, {p['scheduler']}: the long request had ended before "
                       f"{p['requests'] - p['overlapped']} of {p['requests']} loaded requests were sent "
                       "(they ran unloaded)")
        if p["scheduler"] == "continuous" and p["target_met"] is not None:
            out.append(f"interference, continuous: loaded TTFT p99 {p['loaded_vs_unloaded_p99']:.2f}x unloaded "
                       f"(target <= {INTERFERENCE_TARGET:g}x: {'met' if p['target_met'] else 'not met'})")
    return out


def markdown(report: "OpenReport") -> str:
    base = _base_art(report.config)
    parts = [tables.markdown(frame(report.rows, COLUMNS, base), {"scheduler", "ART"})]
    if report.probe:
        parts.append(tables.markdown(frame(report.probe, PROBE_COLUMNS, base), {"scheduler", "ART"}))
    parts.append("\n".join(f"- {line}" for line in notes(report)))
    return "\n\n".join(parts)


def print_report(console, report: "OpenReport") -> None:
    base = _base_art(report.config)
    ends = [i for i, (a, b) in enumerate(zip(report.rows, report.rows[1:])) if a["rate"] != b["rate"]]
    console.print(tables.rich_table(frame(report.rows, COLUMNS, base), "sparta bench serve (open loop)",
                                    left={"scheduler", "ART"}, sections=ends))
    if report.probe:
        console.print(tables.rich_table(frame(report.probe, PROBE_COLUMNS, base), "prefill interference",
                                        left={"scheduler", "ART"}))
    for line in notes(report):
        console.print(line)


def _base_art(cfg: OpenLoopConfig) -> str:
    return "off" if "off" in cfg.art else cfg.art[0]


# -- the whole run ---------------------------------------------------------------------------------
@dataclass
class OpenReport:
    config: OpenLoopConfig
    deployments: dict[str, dict]   # scheduler kind -> {"url", "healthz": what its /healthz said}
    model: str
    rows: list[dict]
    probe: list[dict]
    sustains: list[dict]
    samples: list[OpenSample]
    phases: list[dict]
    environment: dict = field(default_factory=dict)


class Steps:
    """The progress callback, counted over the whole run: `show(label)` as each phase starts."""

    def __init__(self, progress, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def show(self, label: str) -> None:
        if self.progress:
            self.progress(label, self.done, self.total)

    def advance(self) -> None:
        self.done += 1


@dataclass
class Workload:
    """The requests every configuration sends, as (Arrival, prompt ids), and the probe's prompts."""

    arrivals: list[Arrival]
    prompts: list[list[int]]
    probe_short: list[list[int]]
    probe_long: list[int]


def build_workload(cfg: OpenLoopConfig, corpus: list[int]) -> Workload:
    arrivals = workload(cfg.requests, cfg.prompt_tokens, cfg.max_tokens, cfg.seed)
    at = lambda fraction: int(fraction * len(corpus))   # noqa: E731
    rng = np.random.default_rng([cfg.seed, 1])   # the probe's prompts: a stream of their own
    starts = rng.random(cfg.probe_requests + 1)
    return Workload(arrivals, [cut(corpus, a.prompt_tokens, at(a.prompt_start)) for a in arrivals],
                    [cut(corpus, PROBE_PROMPT, at(x)) for x in starts[1:]],
                    cut(corpus, max(cfg.prompt_tokens), at(starts[0])))


def run(cfg: OpenLoopConfig, out: Path, progress=None, checked=None) -> OpenReport:
    """Per scheduler kind: deploy (unless cfg.endpoint), warm up, run the phases (and the probe), stop;
    then summarize. Each deployment is stopped on every exit: normal, error, Ctrl-C or SIGTERM."""
    specs, arts = checked or check(cfg)
    spec = specs[cfg.schedulers[0]]
    if progress:
        progress("building prompts", 0, 1)
    load = build_workload(cfg, essay_tokens(tokenizer_for(spec)))
    plan = phase_plan(cfg.rates, tuple(arts), cfg.rounds)
    steps = Steps(progress, len(cfg.schedulers) * (1 + len(plan) + (2 if cfg.interference else 0)))
    env, deployments, samples, phases = environment(), {}, [], []
    with sigterm_as_ctrl_c():
        for kind in cfg.schedulers:
            deployments[kind] = _deployment(cfg, kind, specs[kind], arts, plan, load, out, steps, samples, phases)
    steps.show("done")
    rows = summarize(samples)
    return OpenReport(cfg, deployments, spec.served_name, rows, probe_rows(samples), static_sustains(rows), samples,
                      phases, env)


def _deployment(cfg, kind, spec, arts, plan, load: Workload, out: Path, steps: Steps, samples, phases) -> dict:
    """Deploy the spec as `kind`, drive it (appending to samples and phases), stop it; its URL and health."""
    from pipelines.http import EndpointError, request_json

    server = None
    steps.show(f"{kind}: deploying {cfg.spec} (log: {out / f'serve-{kind}.log'})")
    if cfg.endpoint:
        url = cfg.endpoint.rstrip("/")
    else:
        state = Path(tempfile.mkdtemp(prefix="sparta-bench-serve-")) / "state.json"
        server = Background.start(Path(cfg.spec), state, out / f"serve-{kind}.log", port=spec.port, scheduler=kind)
        url = server.url
    steps.advance()
    try:
        try:   # what the deployment says it runs, for the record (and the check that the override took)
            health = request_json(url + "/healthz", api_key=spec.resolved_api_key(), timeout=30)
        except EndpointError as e:
            health = {"error": str(e)}
        asyncio.run(_drive(url, spec.served_name, kind, cfg, arts, plan, load, steps, samples, phases,
                           spec.resolved_api_key()))
    finally:
        if server is not None:
            steps.show(f"{kind}: stopping the deployment")
            server.stop()
    return {"url": url, "healthz": health}


async def _drive(url, model, kind, cfg: OpenLoopConfig, arts, plan, load: Workload, steps: Steps,
                 samples: list, phases: list, api_key: str | None = None) -> None:
    import httpx

    limits = httpx.Limits(max_connections=cfg.max_in_flight + 4, max_keepalive_connections=cfg.max_in_flight + 4)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits, headers=headers) as client:
        async def send_one(request, sample):
            await send(client, url, request, sample)

        await _warm_up(send_one, model, kind, arts, load)
        parts = split(cfg.requests, cfg.rounds)
        for rate, label, r in plan:
            if r >= len(parts):
                steps.advance()
                continue
            title = f"{kind}: {rate:g} req/s, art {label}, round {r + 1}"
            steps.show(title)
            jobs = _phase_jobs(model, kind, rate, label, r, arts[label], parts[r], load)
            wall = time.perf_counter()
            await open_loop(send_one, jobs, cfg.max_in_flight,
                            lambda n, t=title, total=len(jobs): steps.show(f"{t}: {n}/{total} answered"))
            samples += [s for _, s in jobs]
            phases.append({"scheduler": kind, "art": label, "rate": rate, "round": r, "requests": len(jobs),
                           "wall_s": time.perf_counter() - wall})
            steps.advance()
        if cfg.interference:
            samples += await _probe(send_one, model, kind, cfg, arts, load, steps)


async def _probe(send_one: Sender, model: str, kind: str, cfg: OpenLoopConfig, arts: dict, load: Workload,
                 steps: Steps) -> list[OpenSample]:
    """The interference probe with the first ART setting: its samples (unloaded, loaded, long)."""
    label = next(iter(arts))
    short = [body(model, ids, PROBE_MAX, arts[label]) for ids in load.probe_short]
    long = body(model, load.probe_long, max(cfg.max_tokens), arts[label])
    samples = {k: [OpenSample(kind, label, 0.0, 0, i, len(ids), PROBE_MAX, kind=k) for i, ids in
                   enumerate(load.probe_short)] for k in (UNLOADED, LOADED)}
    samples[LONG] = [OpenSample(kind, label, 0.0, 0, i, len(load.probe_long), max(cfg.max_tokens), kind=LONG)
                     for i in range(len(short))]
    steps.show(f"{kind}: interference probe, {len(short)} short requests alone")
    await probe_unloaded(send_one, short, samples[UNLOADED])
    steps.advance()
    steps.show(f"{kind}: interference probe, {len(short)} short requests each behind a long one")
    await probe_loaded(send_one, short, long, samples[LOADED], samples[LONG])
    steps.advance()
    return samples[UNLOADED] + samples[LOADED] + samples[LONG]


async def _warm_up(send_one: Sender, model: str, kind: str, arts: dict, load: Workload) -> None:
    """One untimed request per ART setting: first-call costs hit no phase."""
    for label, art in arts.items():
        warm = OpenSample(kind, label, 0.0, -1, 0, len(load.prompts[0]), 4)
        await send_one(body(model, load.prompts[0], 4, art), warm)
        if not warm.ok:
            raise RuntimeError(f"the warm-up request ({kind}, art {label!r}) failed: {warm.status} {warm.error}")


def _phase_jobs(model, kind, rate, label, r, art, part: range, load: Workload) -> list[tuple[dict, OpenSample]]:
    """The phase's requests, their arrival offsets counted from the part's first arrival."""
    offsets = arrival_offsets(load.arrivals, rate)
    jobs = []
    for i in part:
        a = load.arrivals[i]
        sample = OpenSample(kind, label, rate, r, i, a.prompt_tokens, a.max_tokens,
                            arrival_s=offsets[i] - offsets[part[0]])
        jobs.append((body(model, load.prompts[i], a.max_tokens, art), sample))
    return jobs


def write(report: OpenReport, out: Path) -> dict[str, Path]:
    rules = {"sustain_p99_factor": SUSTAIN_P99_FACTOR, "keep_up": KEEP_UP, "interference_target": INTERFERENCE_TARGET,
             "probe_prompt_tokens": PROBE_PROMPT, "probe_max_tokens": PROBE_MAX, "probe_delay_s": PROBE_DELAY_S}
    return write_report(out, "serve-open-" + report.model.replace(":", "_").replace("/", "_"), report.rows,
                        markdown(report), {"config": asdict(report.config), "deployments": report.deployments,
                                           "model": report.model, "environment": report.environment,
                                           "rows": report.rows, "probe": report.probe, "sustains": report.sustains,
                                           "rules": rules, "phases": report.phases,
                                           "samples": [asdict(s) for s in report.samples]})

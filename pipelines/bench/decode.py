"""`sparta bench decode`: decode speed and attention time of KV policies with and without ART, side by
side in one run, against stock transformers `generate`.

Per context: N passkey prompts of exactly `context` tokens are prefilled once per KV policy (the policy's
kvpress press is active only around that prefill). Per batch size, every row decodes from a fresh copy of
that cache tiled to the batch: the stock row with `model.generate` on SDPA and a plain `DynamicCache`,
and per policy one row with ART off and one per ART preset, through our attention function. The rows of
one (context, batch) run round-robin for a few rounds so that machine drift hits them alike; ratios are
taken between rows of the same run.
"""
from __future__ import annotations

import csv
import json
import platform
import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from attention import ARTConfig, enable_art
from attention.cache import tile_cache
from attention.config import parse_art
from attention.generate import Prefilled, greedy_decode, prefill
from attention.hf import POLICIES, make_press, pressed
from pipelines.bench.common import ConfigError, Verdict
from workers.hardware import DTYPES, cpu_name, resolve_dtype

STOCK = "stock"
OFF = "off"
WALK = "walk"   # the ART kernel visiting every block: the second baseline, ART's own contribution
TARGET_ATTENTION_SPEEDUP = 1.4   # ART's targets, checked at the biggest context for batches >= 4
TARGET_TOKENS_SPEEDUP = 1.2
TARGET_MIN_BATCH = 4
TIMED_SDPA = "sparta_timed_sdpa"   # the stock row's attention: SDPA with a stopwatch around it


@dataclass
class BenchDecodeConfig:
    """What to measure. `art`: ART presets by name (`ARTConfig.preset`) or ARTConfig objects (labelled
    "custom", "custom2", ...); each gives one row per policy next to that policy's ART-off row."""

    model: str = "smollm2-135m"
    policies: tuple[str, ...] = ("dense", "streaming", "snapkv")
    contexts: tuple[int, ...] = (1024, 2048, 4096)
    batches: tuple[int, ...] = (1, 4, 16)
    art: tuple = (WALK, "tuned", "certified")
    policy_ratio: float = 0.5
    prompts: int = 4
    new_tokens: int = 12
    rounds: int = 2
    dtype: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        self.policies, self.contexts, self.batches, self.art = (
            tuple(self.policies), tuple(self.contexts), tuple(self.batches), tuple(self.art))
        if not self.policies or len(set(self.policies)) != len(self.policies):
            raise ConfigError("policies", "give one or more distinct policies")
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown:
            raise ConfigError("policies", f"unknown policy {', '.join(map(repr, unknown))}; "
                                          f"valid: {', '.join(POLICIES)}")
        for name, values, low in (("contexts", self.contexts, 16), ("batches", self.batches, 1)):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
                raise ConfigError(name, f"give one or more integers >= {low}, got {list(values)}")
        for name, low in (("prompts", 1), ("new_tokens", 3), ("rounds", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                # new_tokens >= 3: the prefill gives the first token, the first decode step is warm-up
                raise ConfigError(name, f"must be an integer >= {low}, got {value!r}")
        if not 0.0 <= self.policy_ratio < 1.0:
            raise ConfigError("policy_ratio", f"must be in [0, 1), got {self.policy_ratio!r}")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"valid: {', '.join(DTYPES)}; got {self.dtype!r}")
        self.dtype = resolve_dtype(self.dtype, "cpu")   # auto: what this CPU runs natively (the benchmark is CPU-only)
        self.art_configs()   # unknown presets fail here, before any model loads

    def art_configs(self) -> list[tuple[str, ARTConfig]]:
        """(label, config) per ART row; raises ConfigError naming the valid presets."""
        out: list[tuple[str, ARTConfig]] = []
        for i, entry in enumerate(self.art):
            if isinstance(entry, ARTConfig):
                n = sum(isinstance(e, ARTConfig) for e in self.art[:i])
                out.append(("custom" if n == 0 else f"custom{n + 1}", entry))
                continue
            try:
                out.append((str(entry), parse_art(str(entry))))
            except ValueError as e:
                raise ConfigError("art", str(e)) from None
        labels = [label for label, _ in out]
        if len(set(labels)) != len(labels) or OFF in labels:
            raise ConfigError("art", f"give distinct presets, got {', '.join(labels)}")
        return out


@dataclass(frozen=True)
class RowSpec:
    """One row of a (context, batch) block: stock, or a policy with ART off / an ART preset."""

    policy: str
    art: str                       # OFF, a preset label, or "-" for the stock row
    config: ARTConfig | None       # None: the stock row

    @property
    def name(self) -> str:
        return STOCK if self.config is None else f"{self.policy}/{self.art}"


def row_specs(cfg: BenchDecodeConfig) -> list[RowSpec]:
    rows = [RowSpec("dense", "-", None)]
    for policy in cfg.policies:
        rows.append(RowSpec(policy, OFF, ARTConfig(mode="off")))
        rows += [RowSpec(policy, label, art) for label, art in cfg.art_configs()]
    return rows


@dataclass
class Result:
    """One CSV/table row. Times: medians over every measured decode step of all rounds (the first decode
    step of each round is warm-up). Speedups: ART rows vs the same policy's ART-off row of this run."""

    context: int
    batch: int
    row: str
    policy: str
    art: str
    tokens_per_s: float            # batch / median step seconds
    step_ms: float
    step_ms_iqr: float
    attention_ms: float            # median per step of the decode attention time summed over layers
    visited_fraction: float | None   # KV blocks visited / candidate blocks (1.0 with ART off; None: stock)
    passkey_correct: int | None    # distinct prompts of the batch answered right (None: no tokenizer)
    passkey_total: int | None      # distinct prompts in the batch: min(batch, prompts) (None: no tokenizer)
    seqs_differ: int | None        # sequences whose greedy tokens differ from the reference row's
    attention_speedup: float | None = None   # off attention ms / this row's
    tokens_speedup: float | None = None      # this row's tokens/s / off's
    attention_vs_walk: float | None = None   # the same against the policy's walk row (when one was run)
    tokens_vs_walk: float | None = None
    steps: int = 0                 # measured steps per sequence, all rounds
    attention_seconds: float = 0.0   # total decode attention wall time over all rounds (all layers)
    decode_steps: int = 0          # decode forwards over all rounds
    bound_checked: int | None = None     # certified rows: outputs checked against exact attention
    bound_violations: int | None = None  # of those, errors above 2 eps max||v||
    bound_worst: float | None = None     # largest error / (2 eps max||v||)


@dataclass
class Report:
    config: BenchDecodeConfig
    results: list[Result]
    environment: dict
    tokens: dict[tuple[int, int, str], torch.Tensor] = field(repr=False)   # (context, batch, row) -> (batch, n)
    prefill_seconds: dict[str, float] = field(default_factory=dict)        # "context/policy" -> seconds
    warnings: list[str] = field(default_factory=list)


# -- prompts ---------------------------------------------------------------------------------------
@dataclass
class Prompts:
    ids: torch.Tensor              # (N, context), no padding
    passkeys: list[str] | None     # None: random tokens (a model without a tokenizer)
    depths: list[float]


def depths(n: int) -> list[float]:
    """Needle depths spread evenly over 0.1 .. 0.9."""
    return [0.5] if n == 1 else [round(0.1 + 0.8 * i / (n - 1), 4) for i in range(n)]


def make_prompts(tokenizer, context: int, n: int, seed: int, vocab_size: int) -> Prompts:
    """N distinct passkey prompts of exactly `context` tokens (seeded passkeys, haystack starts and
    depths 0.1..0.9); random token ids when there is no tokenizer (random test models)."""
    rng = random.Random(f"{seed}:{context}")
    ds = depths(n)
    if tokenizer is None:
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        return Prompts(torch.randint(3, vocab_size, (n, context), generator=g), None, ds)
    from workers.data.haystack import passkey_ids

    keys: list[str] = []
    while len(keys) < n:
        key = str(rng.randint(10000, 99999))
        if key not in keys:
            keys.append(key)
    ids = [passkey_ids(tokenizer, context, d, k, haystack_start=rng.randrange(10**6)) for d, k in zip(ds, keys)]
    return Prompts(torch.tensor(ids), keys, ds)


def passkey_hits(tokenizer, tokens: torch.Tensor, passkeys: list[str] | None) -> tuple[int | None, int | None]:
    """(right, distinct): sequence i (of the first min(batch, N), each prompt once) is right if its
    decoded text contains passkey i."""
    if tokenizer is None or not passkeys:
        return None, None
    distinct = min(tokens.shape[0], len(passkeys))
    return sum(passkeys[i] in tokenizer.decode(tokens[i]) for i in range(distinct)), distinct


# -- the stock row: transformers generate on SDPA, attention timed -----------------------------------
class _Stopwatch:
    seconds = 0.0


def _timed_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    watch: _Stopwatch | None = getattr(module, "_sparta_stopwatch", None)
    start = time.perf_counter()
    try:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    finally:
        if watch is not None:
            watch.seconds += time.perf_counter() - start


def model_configs(model) -> list:
    cfg = model.config
    return [cfg, *(c for c in (getattr(cfg, "text_config", None),) if c is not None)]


@contextmanager
def sdpa_wrapped(model, name: str, forward, attribute: str, value):
    """`forward` (SDPA with something around it) registered in transformers' AttentionInterface as `name`,
    with SDPA's masks, and selected through the model's config while inside; each attention layer carries
    `value` as `attribute` for it. The previous implementation is restored on exit."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)   # the same masks as SDPA
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    previous = [(c, c._attn_implementation) for c in model_configs(model)]
    try:
        for m in layers:
            setattr(m, attribute, value)
        for c, _ in previous:
            c._attn_implementation = name
        yield value
    finally:
        for c, impl in previous:
            c._attn_implementation = impl
        for m in layers:
            if hasattr(m, attribute):
                delattr(m, attribute)


def timed_sdpa(model):
    """Stock SDPA attention with a stopwatch (`_Stopwatch`, yielded): `sdpa_attention_forward` timed,
    registered as TIMED_SDPA (see `sdpa_wrapped`)."""
    return sdpa_wrapped(model, TIMED_SDPA, _timed_sdpa, "_sparta_stopwatch", _Stopwatch())


def _step_clock(watch: _Stopwatch):
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        """Called once per generated token: wall time and attention time at each call."""

        def __init__(self):
            self.wall, self.attention = [], []

        def __call__(self, input_ids, scores):
            self.wall.append(time.perf_counter())
            self.attention.append(watch.seconds)
            return scores

    return StepClock()


def stock_cache(model, dense: Prefilled, batch: int):
    """A plain `DynamicCache` of the prompts minus their last token, tiled round-robin to `batch`: the
    dense prefill's keys and values without the last position (causal attention: the same as prefilling
    ids[:, :-1])."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    n = dense.next_token.shape[0]
    idx = torch.arange(batch) % n
    for i, layer in enumerate(dense.cache.layers):
        cache.update(layer.keys[idx, :, :-1].contiguous(), layer.values[idx, :, :-1].contiguous(), i)
    return cache


def _pad_id(model) -> int:
    for source in (model.generation_config, model.config):
        pad = getattr(source, "pad_token_id", None)
        if pad is not None:
            return int(pad)
    return 0


@torch.no_grad()
def decode_stock(model, ids: torch.Tensor, dense: Prefilled, batch: int, new_tokens: int):
    """(step seconds, attention seconds per step, tokens (batch, n)): `model.generate` from the cache of
    ids[:, :-1], so it runs the last prompt token and then `new_tokens - 1` decode steps. Step i's time is
    the interval between the logits processor's calls i-1 and i (generate's own per-step work included).
    No eos: like `greedy_decode`, it decodes exactly `new_tokens` tokens and suppresses nothing."""
    from transformers import GenerationConfig, LogitsProcessorList

    idx = torch.arange(batch) % ids.shape[0]
    full = ids[idx]
    cache = stock_cache(model, dense, batch)
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=_pad_id(model))
    with timed_sdpa(model) as watch:
        clock = _step_clock(watch)
        out = model.generate(input_ids=full, attention_mask=torch.ones_like(full), past_key_values=cache,
                             generation_config=gen, logits_processor=LogitsProcessorList([clock]))
    wall = [b - a for a, b in zip(clock.wall, clock.wall[1:])]
    attention = [b - a for a, b in zip(clock.attention, clock.attention[1:])]
    return wall, attention, out[:, ids.shape[1]:]


# -- our rows: greedy_decode through the ART attention function --------------------------------------
@dataclass
class _Decoded:
    wall: list[float]
    attention: list[float]
    tokens: torch.Tensor
    visited: int = 0
    candidates: int = 0
    attention_seconds: float = 0.0
    decode_steps: int = 0


def tile_state(model, state: Prefilled, batch: int) -> Prefilled:
    """A fresh batch of `batch` sequences taken round-robin from a prefilled state (its cache untouched)."""
    idx = torch.arange(batch) % state.next_token.shape[0]
    return replace(state, cache=tile_cache(state.cache, batch, model), next_token=state.next_token[idx],
                   position=state.position[idx], attention_mask=None)


@torch.no_grad()
def decode_ours(model, state: Prefilled, batch: int, spec: RowSpec, cfg: BenchDecodeConfig) -> _Decoded:
    # Quest is a decode-time policy: ART's session applies it. Prefill policies already shaped the cache.
    policy = spec.policy if spec.policy == "quest" else "dense"
    ratio = cfg.policy_ratio if policy == "quest" else 0.0
    state = tile_state(model, state, batch)
    with enable_art(model, spec.config, policy, ratio):
        marks = [0.0]
        decoded = greedy_decode(model, state, cfg.new_tokens,
                                on_step=lambda i, tok: marks.append(model.art_stats().attention_seconds))
        stats = model.art_stats()
    return _Decoded(decoded.step_seconds, [b - a for a, b in zip(marks, marks[1:])], decoded.tokens,
                    stats.visited_blocks, stats.candidate_blocks, stats.attention_seconds, stats.decode_steps)


@torch.no_grad()
def verify_certified(model, state: Prefilled, batch: int, spec: RowSpec, cfg: BenchDecodeConfig):
    """An untimed extra decode of a certified row that checks every call's output against exact fp32
    attention: (checked, violations, worst error / bound)."""
    policy = spec.policy if spec.policy == "quest" else "dense"
    ratio = cfg.policy_ratio if policy == "quest" else 0.0
    with enable_art(model, spec.config, policy, ratio, verify_bound=True):
        greedy_decode(model, tile_state(model, state, batch), cfg.new_tokens)
        stats = model.art_stats()
    return stats.bound_checked, stats.bound_violations, stats.bound_worst


# -- the run ---------------------------------------------------------------------------------------
def load(cfg: BenchDecodeConfig):
    from workers.data.assets import load_model

    overrides = {}
    if cfg.model.startswith("random:"):   # tiny test models: a position range that fits the contexts
        overrides["max_position_embeddings"] = max(cfg.contexts) + cfg.new_tokens + 1
    model, tok = load_model(cfg.model, task="causal_lm", dtype=getattr(torch, cfg.dtype), **overrides)
    return model.eval(), tok


def _prefill_key(policy: str, ratio: float) -> str:
    # Policies without a prefill press (dense, quest, ratio 0) share the plain prefill.
    return "dense" if make_press(policy, ratio) is None else policy


@torch.no_grad()
def prefill_policy(model, ids: torch.Tensor, policy: str, ratio: float) -> Prefilled:
    press = make_press(policy, ratio)
    if press is None:
        return prefill(model, ids)
    with pressed(press, model):   # only around the prefill: decode must not run under the press
        return prefill(model, ids)


def run(cfg: BenchDecodeConfig, progress: Callable[[str, int, int], None] = lambda *a: None,
        model=None, tokenizer=None) -> Report:
    """Measure every row (see the module docstring); `model`/`tokenizer` may be passed in already loaded."""
    if model is None:
        progress(f"loading {cfg.model}", 0, 1)
        model, tokenizer = load(cfg)
    specs = row_specs(cfg)
    prefill_keys = list(dict.fromkeys(["dense", *(_prefill_key(p, cfg.policy_ratio) for p in cfg.policies)]))
    total = len(cfg.contexts) * (len(prefill_keys) + len(cfg.batches) * cfg.rounds * len(specs))
    done = 0
    results: list[Result] = []
    tokens: dict[tuple[int, int, str], torch.Tensor] = {}
    prefill_seconds: dict[str, float] = {}
    warnings: list[str] = []
    for context in cfg.contexts:
        prompts = make_prompts(tokenizer, context, cfg.prompts, cfg.seed, model.config.vocab_size)
        states: dict[str, Prefilled] = {}
        for key in prefill_keys:
            progress(f"prefill {context} tokens x {cfg.prompts} prompts: {key}", done, total)
            states[key] = prefill_policy(model, prompts.ids, key, cfg.policy_ratio)
            prefill_seconds[f"{context}/{key}"] = states[key].prefill_seconds
            done += 1
        for batch in cfg.batches:
            runs: dict[str, list] = {s.name: [] for s in specs}
            for r in range(cfg.rounds):   # round-robin: drift hits every row alike
                for spec in specs:
                    progress(f"context {context}, batch {batch}, round {r + 1}/{cfg.rounds}: {spec.name}",
                             done, total)
                    if spec.config is None:
                        wall, attention, toks = decode_stock(model, prompts.ids, states["dense"], batch,
                                                             cfg.new_tokens)
                        runs[spec.name].append(_Decoded(wall, attention, toks))
                    else:
                        state = states[_prefill_key(spec.policy, cfg.policy_ratio)]
                        runs[spec.name].append(decode_ours(model, state, batch, spec, cfg))
                    done += 1
            block = summarize(context, batch, specs, runs, prompts, tokenizer)
            for spec, res in zip(specs, block):
                if spec.config is not None and spec.config.mode == "certified":
                    progress(f"context {context}, batch {batch}: checking {spec.name}'s error bound", done, total)
                    state = states[_prefill_key(spec.policy, cfg.policy_ratio)]
                    res.bound_checked, res.bound_violations, res.bound_worst = verify_certified(
                        model, state, batch, spec, cfg)
            results += block
            for spec in specs:
                tokens[(context, batch, spec.name)] = runs[spec.name][0].tokens
            stock = next(r for r in block if r.row == STOCK)
            if stock.seqs_differ:
                warnings.append(f"context {context}, batch {batch}: stock generate's greedy tokens differ from "
                                f"dense/off in {stock.seqs_differ} of {batch} sequences before the end of the answer "
                                "(bf16 rounding: stock's SDPA sees an attention mask and takes another kernel)")
    return Report(cfg, results, environment(cfg), tokens, prefill_seconds, warnings)


def _iqr_ms(xs: list[float]) -> float:
    if len(xs) < 4:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return 1e3 * (q[2] - q[0])


def _differ(a: torch.Tensor, b: torch.Tensor, eos: int | None = None) -> int:
    """Sequences whose tokens differ, compared up to and including the reference `b`'s first `eos`: past
    the end of the answer stock generate (min_new_tokens) suppresses eos while our decode does not."""
    n = 0
    for x, y in zip(a, b):
        end = len(y)
        if eos is not None and (y == eos).any():
            end = int((y == eos).nonzero()[0]) + 1
        n += int(not torch.equal(x[:end], y[:end]))
    return n


def summarize(context: int, batch: int, specs: list[RowSpec], runs: dict[str, list[_Decoded]], prompts: Prompts,
              tokenizer) -> list[Result]:
    """The Results of one (context, batch) block from its rounds; every round's first decode step skipped."""
    out: list[Result] = []
    by: dict[str, Result] = {}
    eos = getattr(tokenizer, "eos_token_id", None)
    for spec in specs:
        rounds = runs[spec.name]
        wall = [t for d in rounds for t in d.wall[1:]]
        attention = [t for d in rounds for t in d.attention[1:]]
        step = statistics.median(wall)
        toks = rounds[0].tokens
        right, distinct = passkey_hits(tokenizer, toks, prompts.passkeys)
        visited = sum(d.visited for d in rounds)
        candidates = sum(d.candidates for d in rounds)
        ref = None if spec.config is None else runs[f"{spec.policy}/{OFF}"][0].tokens
        if spec.config is None and f"dense/{OFF}" in runs:
            ref = runs[f"dense/{OFF}"][0].tokens
        res = Result(
            context=context, batch=batch, row=spec.name, policy="-" if spec.config is None else spec.policy,
            art=spec.art, tokens_per_s=batch / step, step_ms=1e3 * step, step_ms_iqr=_iqr_ms(wall),
            attention_ms=1e3 * statistics.median(attention),
            visited_fraction=None if spec.config is None else (visited / candidates if candidates else 1.0),
            passkey_correct=right, passkey_total=distinct,
            seqs_differ=None if ref is None or spec.art == OFF else _differ(toks, ref, eos),
            steps=len(wall),
            attention_seconds=sum(d.attention_seconds if spec.config is not None else sum(d.attention)
                                  for d in rounds),
            decode_steps=sum(d.decode_steps if spec.config is not None else len(d.wall) for d in rounds))
        by[spec.name] = res
        out.append(res)
    for res in out:   # after the loop: the walk row may come after an ART row
        if res.policy == "-" or res.art == OFF:
            continue
        for base, fields in ((OFF, ("attention_speedup", "tokens_speedup")),
                             (WALK, ("attention_vs_walk", "tokens_vs_walk"))):
            ref = by.get(f"{res.policy}/{base}")
            if ref is None or res.art == base:
                continue
            setattr(res, fields[0], ref.attention_ms / res.attention_ms if res.attention_ms else None)
            setattr(res, fields[1], res.tokens_per_s / ref.tokens_per_s)
    return out


# -- verdicts --------------------------------------------------------------------------------------
def verdicts(report: Report) -> list[Verdict]:
    """ART's targets at the biggest context and batches >= 4, per preset and policy: attention speedup
    >= 1.3x, tokens/s speedup >= 1.2x and no passkey lost vs the same policy's ART-off row."""
    cfg = report.config
    biggest = max(cfg.contexts)
    by = {(r.context, r.batch, r.row): r for r in report.results}
    out = []
    for label, _ in cfg.art_configs():
        if label == WALK:
            continue
        for policy in cfg.policies:
            for batch in (b for b in cfg.batches if b >= TARGET_MIN_BATCH):
                on, off = by[(biggest, batch, f"{policy}/{label}")], by[(biggest, batch, f"{policy}/{OFF}")]
                kept = on.passkey_correct is None or on.passkey_correct >= off.passkey_correct
                passkey = ("passkey n/a" if on.passkey_correct is None else
                           f"passkey {on.passkey_correct}/{on.passkey_total} vs {off.passkey_correct}/{off.passkey_total}")
                met = ((on.attention_speedup or 0.0) >= TARGET_ATTENTION_SPEEDUP
                       and on.tokens_speedup >= TARGET_TOKENS_SPEEDUP and kept)
                out.append(Verdict(f"{label} on {policy}, {biggest} tokens, batch {batch}",
                                   f"attention {_x(on.attention_speedup)}, tokens/s {_x(on.tokens_speedup)}, {passkey}",
                                   met))
                if on.attention_vs_walk is not None:   # the same targets against the kernel walking every block
                    met = ((on.attention_vs_walk or 0.0) >= TARGET_ATTENTION_SPEEDUP
                           and on.tokens_vs_walk >= TARGET_TOKENS_SPEEDUP and kept)
                    out.append(Verdict(f"{label} on {policy}, {biggest} tokens, batch {batch}, vs walk",
                                       f"attention {_x(on.attention_vs_walk)}, tokens/s {_x(on.tokens_vs_walk)}, "
                                       f"{passkey}", met))
    checked = [r for r in report.results if r.bound_checked is not None]
    if checked:
        n = sum(r.bound_checked for r in checked)
        bad = sum(r.bound_violations for r in checked)
        worst = max(r.bound_worst for r in checked)
        out.append(Verdict("certified: error <= 2 eps max||v|| on every measured step",
                           f"{n - bad:,}/{n:,} outputs within the bound (worst at {worst:.3g} of it)", bad == 0))
    return out


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


# -- output ----------------------------------------------------------------------------------------
def environment(cfg: BenchDecodeConfig) -> dict:
    import transformers

    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dtype": cfg.dtype,
            "device": "cpu"}


def config_dict(cfg: BenchDecodeConfig) -> dict:
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "art"}
    out["art"] = {label: art.to_dict() for label, art in cfg.art_configs()}
    return out


def write_csv(path: Path, report: Report) -> None:
    """The results as CSV at `path`, and the run's configuration and machine as JSON beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(report.results[0])))
        w.writeheader()
        for r in report.results:
            w.writerow(asdict(r))
    meta = {"config": config_dict(report.config), "environment": report.environment,
            "prefill_seconds": report.prefill_seconds, "warnings": report.warnings,
            "verdicts": [asdict(v) for v in verdicts(report)]}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))

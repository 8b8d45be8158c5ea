"""The serving engines' common part and the static batch engine: one causal LM that turns token prompts into
completions, with a KV policy at prefill and ART at decode. Plain Python, no Ray: `workers.serving.replica`
wraps an engine for Ray Serve, and tests drive them directly.

`Engine` (this module) loads the model, checks requests, and decodes a list of jobs as static batches:
`run(jobs)` groups compatible jobs, prefills each group together and decodes it to its longest budget.
`workers.serving.continuous.ContinuousEngine` serves the same jobs with iteration-level scheduling.

    engine = Engine(EngineConfig(model="smollm2-135m", art=ARTConfig.preset("tuned").to_dict()))
    job = Job(engine.codec.encode("The capital of France is"), max_tokens=8)
    [done] = engine.run([job])          # done.text, done.tokens, done.finish_reason, done.art
"""
from __future__ import annotations

import copy
import os
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from attention import ARTConfig, enable_art
from attention.generate import Prefilled, decode, prefill
from attention.hf import art_supported, make_press, pressed
from workers import hardware
from workers.hardware import DEVICES, DTYPES   # dtype auto: bf16 where the device runs it natively
from adapters.bank import Routing
from workers.serving.adapter_slots import AdapterSlots
from workers.serving.codec import Codec, TextStream, load_tokenizer
from workers.serving.requests import OFF, RequestError, art_config
from workers.serving.sampling import GREEDY, SamplingParams, SequenceSampler, TokenLogprobs, sample


# -- jobs and results ------------------------------------------------------------------------------
@dataclass
class ARTUsage:
    """Decode-attention work of a request: KV blocks visited and candidates, summed over layers, KV heads
    and steps. The continuous engine counts the request's own rows; the static engine the whole batch it
    was decoded in (its kernels count per call). `batch_size`: the largest decode batch it was part of."""

    mode: str
    visited_blocks: int
    candidate_blocks: int
    decode_steps: int
    batch_size: int

    @property
    def skipped_fraction(self) -> float:
        return 1.0 - self.visited_blocks / self.candidate_blocks if self.candidate_blocks else 0.0

    def to_dict(self) -> dict:
        return {"mode": self.mode, "visited_blocks": self.visited_blocks, "candidate_blocks": self.candidate_blocks,
                "skipped_fraction": round(self.skipped_fraction, 6), "decode_steps": self.decode_steps,
                "batch_size": self.batch_size}


@dataclass
class Delta:
    """What one choice of a job produced in a step: text that became final (may be empty while held back),
    the new token ids, their logprobs (when asked for) and, on its last delta, why it ended."""

    index: int
    text: str
    tokens: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None


@dataclass
class Job:
    """One request: prompt token ids, a token budget per choice, stop strings, the ART settings to decode
    with, the KV policy as (policy, ratio) (None: the engine's), sampling parameters and `n` choices.
    `on_delta(delta)` (optional) receives each choice's progress as it is made (for streaming), `on_text(piece)`
    choice 0's text only; setting `cancelled` stops the job at the next step (a client went away)."""

    prompt: list[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    art: ARTConfig = OFF
    on_text: Callable[[str], None] | None = None
    cancelled: bool = False
    kv: tuple[str, float] | None = None
    sampling: SamplingParams = GREEDY
    n: int = 1
    on_delta: Callable[[Delta], None] | None = None
    adapter: int | None = None        # the adapter bank slot it decodes with (a lease from AdapterSlots); None: base

    def emit(self, delta: Delta) -> None:
        if self.on_delta is not None:
            self.on_delta(delta)
        if self.on_text is not None and delta.index == 0 and delta.text:
            self.on_text(delta.text)


@dataclass
class Choice:
    index: int
    tokens: list[int]                 # generated ids, the one that ended it (eos, stop) included
    text: str                         # decoded, cut before a stop string, without eos
    finish_reason: str                # "stop" (eos or a stop string), "length" or "cancelled"
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class Completion:
    choices: list[Choice]
    prompt_tokens: int
    art: ARTUsage
    seconds: float = 0.0              # from the job's arrival to its last token
    # The KV policy applied, which can differ from the one asked for: {"policy": NAME, "ratio": FRACTION},
    # plus "requested" ({"policy", "ratio"}) and "reason" when the engine served the request otherwise (a
    # SnapKV-style press on a prompt shorter than its scoring window runs dense). HTTP responses carry it
    # next to `art`.
    kv: dict = field(default_factory=dict)
    ttft_s: float | None = None       # arrival to the first token
    tpot_s: float | None = None       # mean time per output token after the first (of choice 0)
    prefill_s: float = 0.0            # its batch's prompt prefill (0 when a kept prefill was reused)

    @property
    def tokens(self) -> list[int]:
        return self.choices[0].tokens

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    def timing(self) -> dict:
        """Time to first token and per output token, as the HTTP usage reports them."""
        return {"ttft_s": None if self.ttft_s is None else round(self.ttft_s, 6),
                "tpot_s": None if self.tpot_s is None else round(self.tpot_s, 6),
                "e2e_s": round(self.seconds, 6)}


# -- the engine ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineConfig:
    """What a replica serves. `model`: a packaged alias, a Hugging Face folder or random:<arch>-tiny (a
    registry URI is resolved to these by pipelines.serving.deploy); `adapter`: a sparta adapter folder merged into
    it; `tokenizer`: an alias or folder whose tokenizer to use, or "bytes" (default: the model's own, bytes
    for random models); `art`: ARTConfig fields (None: off) used unless a request overrides them."""

    model: str
    name: str = ""
    adapter: str | None = None
    tokenizer: str | None = None
    model_overrides: dict = field(default_factory=dict)
    dtype: str = "auto"
    device: str = "auto"
    policy: str = "dense"
    policy_ratio: float = 0.0
    art: dict | None = None
    impl: str = "auto"
    max_context: int = 2048
    max_new_tokens: int = 256
    threads: int | None = None
    # continuous (workers.serving.continuous.ContinuousEngine) or static (Engine.run's batches): see build_engine.
    scheduler: str = "continuous"
    # The continuous engine (workers.serving.continuous): KV pool positions (slots of max_context; default 8
    # slots), prompt tokens prefilled per step, requests waiting for a slot before new ones are refused.
    kv_cache_tokens: int | None = None
    max_prefill_tokens: int = 128
    max_queued: int = 64
    # Sampling defaults (workers.serving.sampling.SamplingParams fields) for requests that leave them out.
    sampling: dict = field(default_factory=dict)
    # Adapters served unmerged beside the base, by name -> sparta adapter folder (workers.serving.adapter_slots);
    # at most max_adapters at once (least recently used evicted); runtime_adapters: POST /v1/load_lora_adapter.
    adapters: dict = field(default_factory=dict)
    max_adapters: int = 16
    runtime_adapters: bool = True
    # The static engine: prefilled prompt batches kept (least recently used evicted) for later batches with the
    # same prompts, KV policy and adapter, which then only decode: evaluations that decode one prompt set under
    # many ART settings (ART changes decode only). 0: off; each kept batch holds its whole KV cache.
    prefill_reuse: int = 0
    # Test-only fault injection (like workers.training.trial's _crash_at_step): a batch holding a job whose
    # prompt is exactly these token ids raises inside the ART session, as a failing model call would.
    # Never set by a serve spec (pipelines.serving.deploy builds the config without it).
    _fail_prompt: tuple[int, ...] | None = None
    # Test-only: each continuous-engine step takes at least this long, so that a test can hold the pool full.
    _step_delay_s: float = 0.0

    @property
    def served_name(self) -> str:
        return self.name or self.model


def model_limits(cfg: EngineConfig) -> tuple[int, int]:
    """(max positions, vocabulary size) of the configured model, from its config alone (nothing loaded)."""
    from workers.data import assets

    if cfg.model.startswith("random:"):
        conf = assets.tiny_config(cfg.model.removeprefix("random:").removesuffix("-tiny"), **cfg.model_overrides)
    else:
        import transformers as tf

        conf = tf.AutoConfig.from_pretrained(assets.resolve_model_path(cfg.model), local_files_only=True,
                                             **cfg.model_overrides)
    conf = getattr(conf, "text_config", None) or conf
    return int(getattr(conf, "max_position_embeddings", 0) or 0), int(conf.vocab_size)


class Engine:
    """A loaded model serving `Job`s: `run(jobs)` decodes them in compatible groups and returns one
    `Completion` each, in order."""

    def __init__(self, cfg: EngineConfig):
        import adapters
        from workers.data.assets import load_model

        if cfg.dtype not in DTYPES:
            raise ValueError(f"dtype: valid: {', '.join(DTYPES)}; got {cfg.dtype!r}")
        if cfg.device not in DEVICES:
            raise ValueError(f"device: valid: {', '.join(DEVICES)}; got {cfg.device!r}")
        make_press(cfg.policy, cfg.policy_ratio)   # an unknown policy or bad ratio fails here
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.art = art_config(cfg.art, OFF) if cfg.art is not None else OFF
        positions, vocab = model_limits(cfg)
        if positions and cfg.max_context > positions:
            raise ValueError(f"max_context {cfg.max_context} exceeds the model's {positions} positions")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.device = torch.device(hardware.resolve_device(cfg.device))
        self.dtype = hardware.resolve_dtype(cfg.dtype, self.device)   # what `auto` means on this replica
        self.dtype_reason = hardware.why(self.device) if cfg.dtype == "auto" else "set in the config"
        model, tok = load_model(cfg.model, task="causal_lm", dtype=getattr(torch, self.dtype), **cfg.model_overrides)
        if cfg.adapter:
            model = adapters.load(model, cfg.adapter).merge()
        self.model = model.to(self.device).eval()
        self.adapters = None   # many adapters over the base (not with a merged one: their factors are the base's)
        if cfg.adapter is None and (cfg.adapters or cfg.runtime_adapters):
            self.adapters = AdapterSlots(self.model, cfg.max_adapters)
            if len(cfg.adapters) > cfg.max_adapters:
                raise ValueError(f"{len(cfg.adapters)} adapters but max_adapters is {cfg.max_adapters}")
            for name, path in cfg.adapters.items():
                try:
                    self.adapters.load(name, path)
                except RequestError as e:
                    raise ValueError(f"adapter {name!r}: {e.message}") from None
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        model_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.codec = Codec(load_tokenizer(cfg.tokenizer, tok), model_eos)
        self.vocab_size = vocab
        if len(self.codec) > vocab:
            raise ValueError(f"the tokenizer has {len(self.codec)} tokens but the model's vocabulary only {vocab}")
        self.art_supported = art_supported(self.model)
        self.counters = {"visited_blocks": 0, "candidate_blocks": 0}
        self.prefills = {"run": 0, "reused": 0}   # static batches' prefills: run, and copied from kept ones
        self.kept_prefills: OrderedDict[tuple, tuple[Prefilled, torch.Tensor]] = OrderedDict()
        try:
            self.check_supported(self.art, (cfg.policy, cfg.policy_ratio))
        except RequestError as e:
            raise ValueError(f"{e.message} (the server's default {e.param})") from None

    def load(self) -> dict:
        """Counters for metrics: decode-attention blocks visited and candidate since the start."""
        return dict(self.counters)

    def route(self, routing: Routing):
        """The adapter bank's routing for the forwards inside (nothing without a bank)."""
        return self.adapters.bank.route(routing) if self.adapters is not None else nullcontext()

    def check_supported(self, art: ARTConfig, kv: tuple[str, float]) -> None:
        """RequestError unless this model can decode with `art` and the KV policy `kv`: ART and the KV
        policies hook Llama-family and Gemma-3 attention; other causal LMs (GPT-2, ...) decode plainly."""
        if self.art_supported:
            return
        arch = type(self.model).__name__
        if art.active:
            raise RequestError(f"ART is not available for {arch} (it drives Llama-family and Gemma-3 "
                               "attention); send \"art\": \"off\"", "art")
        if make_press(*kv) is not None or (kv[0] == "quest" and kv[1] > 0):
            raise RequestError(f"KV policy {kv[0]!r} is not available for {arch}; use dense", "kv.policy")

    # -- request checks (cheap, before a job is queued) ---------------------------------------------
    def check_prompt_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        if not ids:
            raise RequestError("the prompt is empty", param)
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param)
        return ids

    def max_tokens_for(self, prompt_tokens: int, max_tokens: int | None, prompt_param: str = "prompt") -> int:
        """The token budget of a request: `max_tokens` checked against the server's limits, or the most
        the context leaves (capped at max_new_tokens). RequestError when they do not fit."""
        cfg = self.cfg
        if max_tokens is not None and not 1 <= max_tokens <= cfg.max_new_tokens:
            raise RequestError(f"max_tokens must be between 1 and {cfg.max_new_tokens} (this server's "
                               f"max_new_tokens), got {max_tokens}", "max_tokens")
        room = cfg.max_context - prompt_tokens
        if room < 1:
            raise RequestError(f"the prompt has {prompt_tokens} tokens, which leaves no room for a completion "
                               f"within the context limit of {cfg.max_context}", prompt_param,
                               code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise RequestError(f"this request needs {prompt_tokens + max_tokens} tokens (prompt {prompt_tokens} + "
                               f"max_tokens {max_tokens}) but the context limit is {cfg.max_context}", "max_tokens",
                               code="context_length_exceeded")
        return max_tokens if max_tokens is not None else min(cfg.max_new_tokens, room)

    def sampler(self, job: Job, index: int) -> SequenceSampler:
        return SequenceSampler(job.sampling, self.vocab_size, self.device, index)

    def applied_kv(self, policy: str, ratio: float, prompt_tokens: int):
        """(press or None, the KV policy as reported): a SnapKV-style press scores from a window of the last
        prompt positions, so a prompt not longer than it keeps its whole KV, and the report says so."""
        press = make_press(policy, ratio)
        kv: dict[str, Any] = {"policy": policy, "ratio": float(ratio)}
        window = getattr(press, "window_size", 0) if press is not None else 0
        if press is not None and prompt_tokens <= window:
            kv = {"policy": "dense", "ratio": 0.0, "requested": kv, "reason": f"the prompt ({prompt_tokens} tokens) "
                  f"is not longer than {policy}'s {window}-position window"}
            press = None
        return press, kv

    def inject_fault(self, prompts) -> None:
        fail = self.cfg._fail_prompt
        if fail is not None and any(list(p) == list(fail) for p in prompts):
            raise RuntimeError(f"injected engine fault (EngineConfig._fail_prompt={list(fail)})")

    # -- static batches ------------------------------------------------------------------------------
    def kv_of(self, job: Job) -> tuple[str, float]:
        return job.kv if job.kv is not None else (self.cfg.policy, self.cfg.policy_ratio)

    @staticmethod
    def _shrinks_cache(policy: str, ratio: float) -> bool:
        return make_press(policy, ratio) is not None or (policy == "quest" and ratio > 0)

    def groups(self, jobs: list[Job]) -> list[list[int]]:
        """Indices of jobs that decode together: one ART config, one KV policy and one adapter per group (all
        are set per model call); left padding only under the dense policy, so other policies group equal
        prompt lengths."""
        out: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            kv = self.kv_of(job)
            shape = len(job.prompt) if self._shrinks_cache(*kv) else None
            out.setdefault((job.art, kv, shape, job.adapter), []).append(i)
        return list(out.values())

    def run(self, jobs: list[Job]) -> list[Completion]:
        """Decode `jobs` as static batches (one per compatible group, each to its longest budget); one
        `Completion` per job, in order."""
        for job in jobs:
            self.check_supported(job.art, self.kv_of(job))
        results: list[Completion | None] = [None] * len(jobs)
        for idx in self.groups(jobs):
            for i, done in zip(idx, self._run_group([jobs[i] for i in idx])):
                results[i] = done
        return results

    @torch.no_grad()
    def _run_group(self, jobs: list[Job]) -> list[Completion]:
        start = time.perf_counter()
        rows = [(job, i) for job in jobs for i in range(job.n)]   # each choice is a row of the batch
        prompts = [job.prompt for job, _ in rows]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.codec.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = None
        if any(len(p) != width for p in prompts):
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        policy, ratio = self.kv_of(jobs[0])
        press, kv = self.applied_kv(policy, ratio, width)
        streams = [TextStream(self.codec, job.max_tokens, job.stop) for job, _ in rows]
        samplers = [self.sampler(job, i) for job, i in rows]
        logprobs: list[list[TokenLogprobs] | None] = [[] if job.sampling.logprobs is not None else None
                                                       for job, _ in rows]
        first: list[float | None] = [None] * len(rows)   # when each row got its first and last token
        last: list[float | None] = [None] * len(rows)

        def pick(logits: torch.Tensor) -> torch.Tensor:
            tokens, lps = sample(logits, samplers)
            for r, lp in enumerate(lps):
                if lp is not None and logprobs[r] is not None and streams[r].finish is None:
                    logprobs[r].append(lp)
            return tokens[:, None]

        def step(_i: int, token: torch.Tensor) -> bool:
            now = time.perf_counter()
            for r, t in enumerate(token[:, 0].tolist()):
                job, index = rows[r]
                stream = streams[r]
                if stream.finish is not None:
                    continue
                first[r] = first[r] if first[r] is not None else now
                if job.cancelled:
                    piece = stream.end("cancelled")
                else:
                    piece = stream.push(t)
                    samplers[r].record(t)
                job.emit(Delta(index, piece, [t] if stream.finish != "cancelled" else [],
                               logprobs[r][-1:] if logprobs[r] else None, stream.finish))
                if stream.finish is not None:
                    last[r] = now
            return all(s.finish is not None for s in streams)

        state = self.prefilled(ids, mask, (policy, ratio), jobs[0].adapter, press, pick)
        quest = policy == "quest" and ratio > 0
        art = jobs[0].art
        # A model ART cannot drive decodes plainly (check_supported has refused ART and policies for it).
        session = (enable_art(self.model, art, "quest" if quest else "dense", ratio if quest else 0.0,
                              impl=self.cfg.impl) if self.art_supported else nullcontext())
        with session, self.route(Routing.uniform(jobs[0].adapter)):
            self.inject_fault(prompts)
            budget = max(j.max_tokens for j in jobs)
            more = not step(-1, state.next_token) and budget > 1
            decoded = decode(self.model, state, budget, on_step=step, pick=pick) if more else None
            stats = session.stats() if self.art_supported else None
        end = time.perf_counter()
        for r, stream in enumerate(streams):   # rows the batch's last step left unfinished
            if stream.finish is None:
                job, index = rows[r]
                job.emit(Delta(index, stream.end("length"), [], None, "length"))
                last[r] = end
        steps = stats.decode_steps if stats else (len(decoded.step_seconds) if decoded else 0)
        if stats:
            self.counters["visited_blocks"] += stats.visited_blocks
            self.counters["candidate_blocks"] += stats.candidate_blocks
        usage = ARTUsage(art.mode if art.active else "off", stats.visited_blocks if stats else 0,
                         stats.candidate_blocks if stats else 0, steps, len(rows))
        out, r = [], 0
        for job in jobs:
            mine = range(r, r + job.n)
            r += job.n
            choices = [Choice(i, streams[k].tokens, streams[k].text, streams[k].finish, logprobs[k])
                       for i, k in enumerate(mine)]
            k0, n0 = mine[0], len(choices[0].tokens)
            ttft = first[k0] - start if first[k0] is not None else None
            tpot = (last[k0] - first[k0]) / (n0 - 1) if n0 > 1 and first[k0] is not None else None
            out.append(Completion(choices, len(job.prompt), usage, max(last[k] for k in mine) - start, dict(kv),
                                  ttft, tpot, state.prefill_seconds))
        return out

    def prefilled(self, ids: torch.Tensor, mask: torch.Tensor | None, kv: tuple[str, float], adapter: str | None,
                  press, pick) -> Prefilled:
        """The prompt batch `ids` after prefill under the KV policy's press, its first token chosen by `pick`;
        a copy of a kept one when `prefill_reuse` allows (`pick` then reads the kept last-position logits, so
        a seeded sampler draws what it would have drawn after a fresh prefill)."""
        served = self.adapters.entries.get(adapter) if self.adapters is not None and adapter else None
        key = (tuple(map(tuple, ids.tolist())), None if mask is None else tuple(map(tuple, mask.tolist())),
               kv, adapter, served.path if served else None)   # an adapter reloaded from elsewhere: a new key
        kept = self.kept_prefills.get(key) if self.cfg.prefill_reuse else None
        if kept is not None:
            self.kept_prefills.move_to_end(key)
            self.prefills["reused"] += 1
            state, logits = kept
            return replace(state, cache=copy.deepcopy(state.cache), next_token=pick(logits), prefill_seconds=0.0)
        last: list[torch.Tensor] = []

        def keep_logits(logits: torch.Tensor) -> torch.Tensor:
            last.append(logits)
            return pick(logits)

        with self.route(Routing.uniform(adapter)), pressed(press, self.model):
            state = prefill(self.model, ids, mask, pick=keep_logits)   # the policy shapes the prompt's KV
        self.prefills["run"] += 1
        if self.cfg.prefill_reuse:   # decode appends to state's cache in place: keep a copy
            self.kept_prefills[key] = (replace(state, cache=copy.deepcopy(state.cache)), last[0])
            while len(self.kept_prefills) > self.cfg.prefill_reuse:
                self.kept_prefills.popitem(last=False)
        return state

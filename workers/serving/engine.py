"""The serving engine: one causal LM that turns token prompts into greedy completions, a batch at a time,
with a KV policy at prefill and ART at decode. Plain Python, no Ray: `workers.serving.replica` wraps it for Ray
Serve, and tests drive it directly.

    engine = Engine(EngineConfig(model="smollm2-135m", art=ARTConfig.preset("tuned").to_dict()))
    job = Job(engine.codec.encode("The capital of France is"), max_tokens=8)
    [done] = engine.run([job])          # done.text, done.tokens, done.finish_reason, done.art
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch

from attention import ARTConfig, enable_art
from attention.config import PRESETS, parse_art
from attention.generate import greedy_decode, prefill
from attention.hf import POLICIES, art_supported, make_press
from workers import hardware
from workers.hardware import DEVICES, DTYPES   # dtype auto: bf16 where the device runs it natively

BYTES = "bytes"   # the tokenizer name of workers.data.datasets.ByteTokenizer (what the tiny random models train with)
# Serving bounds on ART fields beyond ARTConfig's own checks, so one request cannot make a replica crawl.
ART_BOUNDS = {"block_size": (8, 1024), "patience": (1, 256), "min_blocks": (1, 4096), "sink_tokens": (0, 4096),
              "recent_blocks": (0, 256)}
OFF = ARTConfig(mode="off")


class RequestError(ValueError):
    """A request (or spec value) the engine refuses: `param` names the field, `code` is a short
    OpenAI-style error code, `status` the HTTP status a server answers with."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def _art_value(name: str, value: Any, param: str):
    default = getattr(ARTConfig(), name)
    ok = (isinstance(value, bool) if isinstance(default, bool) else
          isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int) else
          isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float) else
          isinstance(value, str))
    if not ok:
        kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[type(default)]
        raise RequestError(f"ART field {name!r} must be {kind}, got {value!r}", f"{param}.{name}")
    return float(value) if isinstance(default, float) else value


def art_config(value: Any, base: ARTConfig = OFF, param: str = "art") -> ARTConfig:
    """ART settings from a spec or a request: None (`base`), "off", a preset with optional overrides
    ("tuned", "tuned+tau=1e-3+block_size=32"), or a dict of ARTConfig fields, optionally with "preset"
    (the dict's fields override that preset, else `base`). Raises RequestError naming the bad field."""
    if value is None:
        cfg = base
    elif isinstance(value, str):
        if value.strip() == "off":
            return OFF
        try:
            cfg = parse_art(value.strip())
        except ValueError as e:
            hint = " (or off)" if "preset" in str(e) else f"; presets: {', '.join(PRESETS)}, off"
            raise RequestError(f"{e}{hint}", param) from None
    elif isinstance(value, dict):
        valid = [f.name for f in fields(ARTConfig)]
        unknown = [k for k in value if k not in valid and k != "preset"]
        if unknown:
            raise RequestError(f"unknown ART field {unknown[0]!r}; valid: preset, {', '.join(valid)}",
                               f"{param}.{unknown[0]}", code="unknown_art_field")
        start = base
        if "preset" in value:
            name = value["preset"]
            if name == "off":
                start = OFF
            elif not isinstance(name, str) or name not in PRESETS:
                raise RequestError(f"unknown ART preset {name!r}; valid: {', '.join(PRESETS)}, off", f"{param}.preset")
            else:
                start = ARTConfig.preset(name)
        overrides = {k: _art_value(k, v, param) for k, v in value.items() if k != "preset"}
        try:
            cfg = start.with_overrides(**overrides)
        except ValueError as e:
            raise RequestError(str(e), param) from None
    elif isinstance(value, bool):
        # Strict for JSON's booleans: "off" says what is meant; true names no setting. (A serve spec maps
        # YAML's bare `off`, read as False, to "off" before it gets here: pipelines.serving.spec.)
        raise RequestError(f"give ART settings as a preset name ({', '.join(PRESETS)}; optional +field=value "
                           f"overrides), \"off\", or an object of ARTConfig fields; got {str(value).lower()}"
                           + ('; to turn ART off send "off"' if not value else ""), param)
    else:
        raise RequestError(f"give ART settings as a preset name (with optional +field=value overrides), off, "
                           f"or an object of ARTConfig fields; got {value!r}", param)
    for name, (low, high) in ART_BOUNDS.items():
        v = getattr(cfg, name)
        if not low <= v <= high:
            raise RequestError(f"ART field {name!r} must be in [{low}, {high}] when serving, got {v!r}", f"{param}.{name}")
    return cfg


def kv_config(value: Any, base: tuple[str, float], param: str = "kv") -> tuple[str, float]:
    """A request's KV policy: None (`base`, the server's), or {"policy": NAME, "ratio": FRACTION} (a
    missing ratio is 0, a missing policy the server's). Raises RequestError naming the bad field."""
    if value is None:
        return base
    if not isinstance(value, dict):
        raise RequestError(f"give the KV policy as an object {{\"policy\": NAME, \"ratio\": FRACTION}}, got {value!r}", param)
    unknown = [k for k in value if k not in ("policy", "ratio")]
    if unknown:
        raise RequestError(f"unknown KV field {unknown[0]!r}; valid: policy, ratio", f"{param}.{unknown[0]}",
                           code="unknown_kv_field")
    policy, ratio = value.get("policy", base[0]), value.get("ratio", 0.0)
    if not isinstance(policy, str) or policy not in POLICIES:
        raise RequestError(f"unknown KV policy {policy!r}; valid: {', '.join(POLICIES)}", f"{param}.policy")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise RequestError(f"KV ratio must be a number in [0, 1), got {ratio!r}", f"{param}.ratio")
    return policy, float(ratio)


# -- text <-> tokens -------------------------------------------------------------------------------
class Codec:
    """Text and chat messages <-> token ids: a Hugging Face tokenizer, or the byte tokenizer of
    workers.data.datasets for the tiny random models. Chat uses the tokenizer's template when it has one, else
    a plain "role: content" transcript ending in "assistant:"."""

    def __init__(self, tokenizer, model_eos: list[int] | None = None):
        self.tok = tokenizer
        self.hf = hasattr(tokenizer, "apply_chat_template")   # else the byte tokenizer
        eos = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
        self.eos_ids = frozenset(eos | set(model_eos or ()))
        self.pad_id = getattr(tokenizer, "pad_token_id", None)
        if self.pad_id is None:
            self.pad_id = min(self.eos_ids) if self.eos_ids else 0
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def __len__(self) -> int:
        return len(self.tok) if self.hf else 256

    def encode(self, text: str) -> list[int]:
        if self.hf:
            return list(self.tok(text, add_special_tokens=True)["input_ids"])
        return self.tok.encode(text, add_special_tokens=False)

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        if self.has_template:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # The template spells out its own special tokens (<bos>, <|im_start|>): add none twice.
            return list(self.tok(text, add_special_tokens=False)["input_ids"])
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


# -- jobs and results ------------------------------------------------------------------------------
@dataclass
class ARTUsage:
    """Decode-attention work for the batch a request was decoded in (the kernels count per call, over
    every sequence of the batch): KV blocks visited and candidates, summed over layers, KV heads and steps."""

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
class Job:
    """One request: prompt token ids, a token budget, stop strings, the ART settings to decode with and
    the KV policy as (policy, ratio) (None: the engine's). `on_text(piece)` (optional) receives the
    completion's text as it grows (for streaming); setting `cancelled` stops the job at the next step (a
    client went away)."""

    prompt: list[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    art: ARTConfig = OFF
    on_text: Callable[[str], None] | None = None
    cancelled: bool = False
    kv: tuple[str, float] | None = None


@dataclass
class Completion:
    tokens: list[int]                 # generated ids, the one that ended it (eos, stop) included
    text: str                         # decoded, cut before a stop string, without eos
    finish_reason: str                # "stop" (eos or a stop string), "length" or "cancelled"
    prompt_tokens: int
    art: ARTUsage
    seconds: float = 0.0              # wall time of the batch it was decoded in
    # The KV policy applied, which can differ from the one asked for: {"policy": NAME, "ratio": FRACTION},
    # plus "requested" ({"policy", "ratio"}) and "reason" when the engine served the request otherwise (a
    # SnapKV-style press on a prompt shorter than its scoring window runs dense). HTTP responses carry it
    # next to `art`.
    kv: dict = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class _Row:
    """One sequence of a decode batch: its tokens, text, stop check and streamed prefix."""

    def __init__(self, job: Job, codec: Codec):
        self.job, self.codec = job, codec
        self.tokens: list[int] = []
        self.text, self.sent, self.finish = "", 0, None

    def push(self, token: int) -> bool:
        """Take the next generated token; True once the row is finished (later tokens are ignored)."""
        if self.finish is not None:
            return True
        if self.job.cancelled:
            self.finish = "cancelled"
            return True
        self.tokens.append(token)
        if token in self.codec.eos_ids:
            return self._end("stop")
        text = self.codec.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.job.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            return self._end("stop")
        self.text = text
        if len(self.tokens) >= self.job.max_tokens:
            return self._end("length")
        self._emit(self._stable_end(text))
        return False

    def _stable_end(self, text: str) -> int:
        # Hold back what may still change: an unfinished UTF-8 character (decoded as U+FFFD) and a tail
        # that could be the start of a stop string.
        end = len(text.rstrip("\ufffd"))
        for s in self.job.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end -= k
                    break
        return end

    def _end(self, reason: str) -> bool:
        self.finish = reason
        self._emit(len(self.text))
        return True

    def _emit(self, end: int) -> None:
        if end > self.sent and self.job.on_text is not None:
            self.job.on_text(self.text[self.sent:end])
        self.sent = max(self.sent, end)


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
    # Test-only fault injection (like workers.training.trial's _crash_at_step): a batch holding a job whose
    # prompt is exactly these token ids raises inside the ART session, as a failing model call would.
    # Never set by a serve spec (pipelines.serving.deploy builds the config without it).
    _fail_prompt: tuple[int, ...] | None = None

    @property
    def served_name(self) -> str:
        return self.name or self.model


def load_tokenizer(name: str | None, model_tokenizer=None):
    """The tokenizer a replica uses (see EngineConfig.tokenizer)."""
    if name is None and model_tokenizer is not None:
        return model_tokenizer
    if name is None or name == BYTES:
        from workers.data.datasets import ByteTokenizer

        return ByteTokenizer()
    import transformers as tf

    from workers.data.assets import resolve_model_path

    return tf.AutoTokenizer.from_pretrained(resolve_model_path(name), local_files_only=True)


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
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        model_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.codec = Codec(load_tokenizer(cfg.tokenizer, tok), model_eos)
        self.vocab_size = vocab
        if len(self.codec) > vocab:
            raise ValueError(f"the tokenizer has {len(self.codec)} tokens but the model's vocabulary only {vocab}")
        self.art_supported = art_supported(self.model)
        try:
            self.check_supported(self.art, (cfg.policy, cfg.policy_ratio))
        except RequestError as e:
            raise ValueError(f"{e.message} (the server's default {e.param})") from None

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

    # -- decoding ----------------------------------------------------------------------------------
    def kv_of(self, job: Job) -> tuple[str, float]:
        return job.kv if job.kv is not None else (self.cfg.policy, self.cfg.policy_ratio)

    @staticmethod
    def _shrinks_cache(policy: str, ratio: float) -> bool:
        return make_press(policy, ratio) is not None or (policy == "quest" and ratio > 0)

    def groups(self, jobs: list[Job]) -> list[list[int]]:
        """Indices of jobs that decode together: one ART config and one KV policy per group (both are set
        per model call); left padding only under the dense policy, so other policies group equal prompt
        lengths."""
        out: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            kv = self.kv_of(job)
            out.setdefault((job.art, kv, len(job.prompt) if self._shrinks_cache(*kv) else None), []).append(i)
        return list(out.values())

    def run(self, jobs: list[Job]) -> list[Completion]:
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
        width = max(len(j.prompt) for j in jobs)
        ids = torch.tensor([[self.codec.pad_id] * (width - len(j.prompt)) + j.prompt for j in jobs], device=self.device)
        mask = None
        if any(len(j.prompt) != width for j in jobs):
            mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in jobs], device=self.device)
        policy, ratio = self.kv_of(jobs[0])
        press = make_press(policy, ratio)
        kv: dict[str, Any] = {"policy": policy, "ratio": float(ratio)}
        window = getattr(press, "window_size", 0) if press is not None else 0
        if press is not None and width <= window:
            # SnapKV-style presses score from a window of the last prompt positions: too short, so the
            # prompt's KV stays whole; say so rather than report a policy that did not run.
            press = None
            kv = {"policy": "dense", "ratio": 0.0, "requested": kv,
                  "reason": f"the prompt ({width} tokens) is not longer than {policy}'s {window}-position window"}
        with press(self.model) if press is not None else nullcontext():   # the policy shapes the prompt's KV
            state = prefill(self.model, ids, mask)
        rows = [_Row(j, self.codec) for j in jobs]
        quest = policy == "quest" and ratio > 0
        art = jobs[0].art
        # A model ART cannot drive decodes plainly (check_supported has refused ART and policies for it).
        session = (enable_art(self.model, art, "quest" if quest else "dense", ratio if quest else 0.0,
                              impl=self.cfg.impl) if self.art_supported else nullcontext())
        with session:
            fail = self.cfg._fail_prompt
            if fail is not None and any(list(j.prompt) == list(fail) for j in jobs):
                raise RuntimeError(f"injected engine fault (EngineConfig._fail_prompt={list(fail)})")

            def step(_i: int, token: torch.Tensor) -> bool:
                return all([row.push(t) for row, t in zip(rows, token[:, 0].tolist())])

            budget = max(j.max_tokens for j in jobs)
            decode = not step(-1, state.next_token) and budget > 1
            decoded = greedy_decode(self.model, state, budget, on_step=step) if decode else None
            stats = session.stats() if self.art_supported else None
        steps = stats.decode_steps if stats else (len(decoded.step_seconds) if decoded else 0)
        usage = ARTUsage(art.mode if art.active else "off", stats.visited_blocks if stats else 0,
                         stats.candidate_blocks if stats else 0, steps, len(jobs))
        seconds = time.perf_counter() - start
        return [Completion(r.tokens, r.text, r.finish or "length", len(r.job.prompt), usage, seconds, dict(kv))
                for r in rows]

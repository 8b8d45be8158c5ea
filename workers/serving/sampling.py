"""Per-request sampling for the serving engine: OpenAI's sampling parameters, each sequence's own random
state and token counts, and the batched sampler that turns a decode step's logits into tokens (and logprobs).

    seqs = [SequenceSampler(params, vocab_size, device, index=i) for i in range(n)]
    tokens, logprobs = sample(logits, seqs)      # row r drawn for seqs[r]
    for seq, token in zip(seqs, tokens.tolist()):
        seq.record(token)

A row's token depends only on its own logits and its own generator, never on the other rows of the batch.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from workers.serving.requests import RequestError

MAX_LOGPROBS = 20
# Below this a temperature is treated as this one: logits / 1e-30 overflow to inf and softmax turns them to NaN,
# while at 1e-5 the distribution is already a point mass on the argmax for any realistic logit gap.
MIN_TEMPERATURE = 1e-5
# float32 cumulative sums land a few ulps either side of the exact value; without slack top_p=0.68 over
# probabilities 0.35, 0.33, 0.32 keeps the third token because softmax's 0.35 + 0.33 sums to 0.67999995.
TOP_P_SLACK = 1e-6


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings, as the OpenAI API defines them (top_k is vLLM's extra). Invalid
    values raise RequestError naming the field and its valid range."""

    temperature: float = 1.0           # 0 = greedy
    top_p: float = 1.0                 # in (0, 1]; 1 = off
    top_k: int = 0                     # 0 = off
    seed: int | None = None            # None = fresh OS entropy
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None        # None = none; k = the chosen token's logprob and the k most likely

    def __post_init__(self):
        self._check_number("temperature", 0.0, 2.0, "[0, 2]")
        self._check_number("top_p", 0.0, 1.0, "(0, 1]", open_low=True)
        self._check_number("presence_penalty", -2.0, 2.0, "[-2, 2]")
        self._check_number("frequency_penalty", -2.0, 2.0, "[-2, 2]")
        if not _integer(self.top_k) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}", "top_k")
        if self.seed is not None and not _integer(self.seed):
            raise RequestError(f"seed must be an integer or null, got {self.seed!r}", "seed")
        if self.logprobs is not None and (not _integer(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise RequestError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or null, got {self.logprobs!r}",
                               "logprobs")

    def _check_number(self, name: str, low: float, high: float, interval: str, open_low: bool = False):
        value = getattr(self, name)
        # `not low <= value` also refuses NaN.
        if not _number(value) or not low <= value <= high or (open_low and value == low):
            raise RequestError(f"{name} must be a number in {interval}, got {value!r}", name)
        object.__setattr__(self, name, float(value))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


GREEDY = SamplingParams(temperature=0.0)
FIELDS = tuple(f.name for f in fields(SamplingParams))


def sampling_params(values: dict[str, Any], defaults: SamplingParams) -> SamplingParams:
    """A request's SamplingParams: `values` maps field names to the request's values (None = left out, so
    `defaults`' value). Raises RequestError naming an unknown or invalid field."""
    unknown = [name for name in values if name not in FIELDS]
    if unknown:
        raise RequestError(f"unknown sampling field {unknown[0]!r}; valid: {', '.join(FIELDS)}", unknown[0])
    return replace(defaults, **{name: value for name, value in values.items() if value is not None})


def _generator_seed(seed: int | None, index: int) -> int:
    """A 64-bit seed for choice `index` of a request: derived from (seed, index) when seeded, so choices are
    reproducible yet differ from one another; fresh OS entropy otherwise."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little")
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class SequenceSampler:
    """One sequence's sampling state: its params, its own generator on `device`, and (only when a penalty
    is set) the counts of the tokens it has generated so far."""

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device | str, index: int = 0):
        self.params, self.vocab_size, self.index = params, vocab_size, index
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(_generator_seed(params.seed, index))
        self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=device) if params.penalised else None

    def record(self, token: int | Tensor):
        """Count a token this sequence generated (a no-op without penalties)."""
        if self.counts is not None:
            self.counts[token] += 1


@dataclass
class TokenLogprobs:
    """The chosen token's logprob under the model's raw distribution, and the `k` most likely tokens
    (id, logprob), most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def apply_penalties(logits: Tensor, counts: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
    """OpenAI's penalties on rows of logits (m, V): logit[j] - count[j] * frequency - (count[j] > 0) * presence,
    with per-row `presence` and `frequency` (m,) and token counts (m, V)."""
    counts = counts.float()
    return logits - counts * frequency[:, None] - (counts > 0).float() * presence[:, None]


def _row_values(seqs: list[SequenceSampler], name: str, device: torch.device, dtype=torch.float32) -> Tensor:
    return torch.tensor([getattr(s.params, name) for s in seqs], dtype=dtype, device=device)


def _penalise(logits: Tensor, seqs: list[SequenceSampler]) -> Tensor:
    rows = [r for r, s in enumerate(seqs) if s.counts is not None]
    if not rows:
        return logits
    penalised = [seqs[r] for r in rows]
    if any(s.counts.shape[0] != logits.shape[1] for s in penalised):
        raise ValueError(f"a sequence counts tokens over a vocabulary other than the logits' {logits.shape[1]}")
    index = torch.tensor(rows, device=logits.device)
    out = logits.clone()
    out[index] = apply_penalties(logits[index], torch.stack([s.counts for s in penalised]),
                                 _row_values(penalised, "presence_penalty", logits.device),
                                 _row_values(penalised, "frequency_penalty", logits.device))
    return out


def _top_k_top_p_mask(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """True where a token is cut by its row's top-k (0 = off) or, over the top-k renormalised
    distribution, by its row's top-p (1 = off). The most likely token is never cut."""
    ranked, order = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(logits.shape[1], device=logits.device)
    cut = (top_k[:, None] > 0) & (rank[None, :] >= top_k[:, None])
    probs = ranked.masked_fill(cut, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # A token is cut once the more likely ones already hold top_p; the first has 0 before it, so it stays.
    cut |= (top_p[:, None] < 1.0) & (mass_before >= top_p[:, None] - TOP_P_SLACK)
    cut[:, 0] = False
    return torch.zeros_like(cut).scatter(1, order, cut)


def _sampling_probs(logits: Tensor, seqs: list[SequenceSampler]) -> Tensor:
    """The distribution each (non-greedy) row draws from: temperature, then top-k, then top-p."""
    temperature = _row_values(seqs, "temperature", logits.device).clamp_min(MIN_TEMPERATURE)
    scaled = logits / temperature[:, None]
    if any(s.params.top_k > 0 or s.params.top_p < 1.0 for s in seqs):
        cut = _top_k_top_p_mask(scaled, _row_values(seqs, "top_k", logits.device, torch.long),
                                _row_values(seqs, "top_p", logits.device))
        scaled = scaled.masked_fill(cut, float("-inf"))
    return scaled.softmax(dim=-1)


def _draw(probs: Tensor, seqs: list[SequenceSampler]) -> Tensor:
    """One token per row from `probs` by the exponential race: argmax(p / E), E ~ Exp(1), is distributed as p.
    Each row's E comes from its own generator, so its token does not depend on the rest of the batch."""
    vocab = probs.shape[1]
    noise = torch.stack([torch.empty(vocab, device=probs.device).exponential_(generator=s.generator)
                         for s in seqs])
    # Exp(1) may round to 0; 0 / 0 would be NaN, which argmax takes as the maximum.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _logprobs(logits: Tensor, tokens: Tensor, seqs: list[SequenceSampler]) -> list[TokenLogprobs | None]:
    """Logprobs under the model's raw distribution (before penalties, temperature, top-k/p) for the rows
    that ask for them, with one transfer to the host."""
    rows = [r for r, s in enumerate(seqs) if s.params.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(seqs)
    if not rows:
        return out
    index = torch.tensor(rows, device=logits.device)
    logprobs = logits[index].log_softmax(dim=-1)
    chosen_tokens = tokens[index]
    chosen = logprobs.gather(1, chosen_tokens[:, None])[:, 0]
    k = min(max(seqs[r].params.logprobs for r in rows), logits.shape[1])
    top_values, top_ids = logprobs.topk(k, dim=-1)
    chosen_tokens, chosen, top_values, top_ids = (t.tolist() for t in (chosen_tokens, chosen, top_values, top_ids))
    for i, r in enumerate(rows):
        k_r = seqs[r].params.logprobs
        out[r] = TokenLogprobs(chosen_tokens[i], chosen[i], list(zip(top_ids[i][:k_r], top_values[i][:k_r])))
    return out


def sample(logits: Tensor, seqs: list[SequenceSampler]) -> tuple[Tensor, list[TokenLogprobs | None]]:
    """One token per row of `logits` (m, V), row r for seqs[r]: penalties, then temperature, top-k, top-p and a
    draw from the row's own generator; greedy rows take the argmax of the penalised logits and draw nothing.
    Returns the tokens (m,) on the logits' device and each row's TokenLogprobs (None where not asked for)."""
    if logits.dim() != 2 or logits.shape[0] != len(seqs):
        raise ValueError(f"expected logits of shape ({len(seqs)}, vocab), got {tuple(logits.shape)}")
    logits = logits.float()
    penalised = _penalise(logits, seqs)
    tokens = penalised.argmax(dim=-1)
    rows = [r for r, s in enumerate(seqs) if not s.params.greedy]
    if rows:
        drawn = [seqs[r] for r in rows]
        index = torch.tensor(rows, device=logits.device)
        tokens[index] = _draw(_sampling_probs(penalised[index], drawn), drawn)
    return tokens, _logprobs(logits, tokens, seqs)

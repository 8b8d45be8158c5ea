"""Prefill and decode (greedy, or any token picker) with explicit positions, so that a KV policy may shrink the cache.

`model.generate` derives each new token's position from the cache length; after a KV policy (a kvpress
press) drops part of the prompt's cache that position is wrong. Here the positions count the prompt's
real tokens (as kvpress's own pipeline does), and the cache is ours (`attention.cache.new_cache`).
Whatever ART session or press is active on the model applies to these calls.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from attention.cache import new_cache


@dataclass
class Prefilled:
    """A prompt batch after prefill: its cache, the first generated token and the next position."""

    cache: object
    next_token: torch.Tensor          # (batch, 1) greedy token after the prompt
    position: torch.Tensor            # (batch, 1) position id of next_token
    attention_mask: torch.Tensor | None = None   # (batch, cached + 1) when the prompt was padded
    prefill_seconds: float = 0.0


@dataclass
class Decoded:
    tokens: torch.Tensor              # (batch, n) generated tokens, the first one from prefill included
    step_seconds: list[float] = field(default_factory=list)   # wall time of each decode forward


Pick = Callable[[torch.Tensor], torch.Tensor]   # (batch, vocab) last-position logits -> (batch, 1) token ids


def argmax_pick(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1, keepdim=True)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            cache=None, pick: Pick = argmax_pick) -> Prefilled:
    """Run the prompt through `model` (left padding allowed with `attention_mask`); `pick` chooses the
    first new token from the last position's logits (default: greedy)."""
    cache = new_cache(model) if cache is None else cache
    if attention_mask is None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    else:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    start = time.perf_counter()
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - start
    mask = None
    if attention_mask is not None:
        if cache.get_seq_length() != input_ids.shape[1]:
            raise ValueError("a KV policy that shrinks the cache needs unpadded prompts of equal length")
        mask = torch.cat([attention_mask, attention_mask.new_ones(input_ids.shape[0], 1)], -1)
    return Prefilled(cache, pick(out.logits[:, -1]), positions[:, -1:] + 1, mask, seconds)


def greedy_decode(model, state: Prefilled, max_new_tokens: int,
                  on_step: Callable[[int, torch.Tensor], bool | None] | None = None) -> Decoded:
    """`decode` taking the most likely token at every step."""
    return decode(model, state, max_new_tokens, on_step)


@torch.no_grad()
def decode(model, state: Prefilled, max_new_tokens: int,
           on_step: Callable[[int, torch.Tensor], bool | None] | None = None, pick: Pick = argmax_pick) -> Decoded:
    """Tokens after `state` (which is advanced in place), each chosen by `pick` from the logits (default:
    greedy): `max_new_tokens` in all, the prefill's token first. `on_step(i, token)` is called after each
    decode forward; if it returns True, decoding stops there (a server whose sequences have all finished)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tokens = [state.next_token]
    times = []
    for i in range(max_new_tokens - 1):
        start = time.perf_counter()
        out = model(input_ids=state.next_token, position_ids=state.position, attention_mask=state.attention_mask,
                    past_key_values=state.cache, use_cache=True)
        state.next_token = pick(out.logits[:, -1])
        times.append(time.perf_counter() - start)
        state.position = state.position + 1
        if state.attention_mask is not None:
            state.attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(
                state.attention_mask.shape[0], 1)], -1)
        tokens.append(state.next_token)
        if on_step is not None and on_step(i, state.next_token):
            break
    return Decoded(torch.cat(tokens, -1), times)

"""ART inside Hugging Face transformers: decode steps of an attention layer run `decode_attention`,
prefill stays on SDPA.

The narrowest hook transformers offers is its attention interface: we register one function under our
own name and point the model's config at it while ART is enabled; the function reads its settings from
the attention module it is called for, so nothing global changes behaviour and disabling restores the
model exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from attention.config import ARTConfig
from attention.reference import decode_attention

IMPLEMENTATION = "sparta_art"
# KV policies. Prefill policies are kvpress presses (NVIDIA's library; its pinned transformers range
# loads our models). Quest is a decode-time policy built on our per-block key bounds: each step keeps
# the (1 - ratio) best-bounded blocks. H2O-style heavy hitters need eager attention weights at prefill:
# not offered yet.
POLICIES = {"dense": None, "streaming": "StreamingLLMPress", "snapkv": "SnapKVPress",
            "pyramidkv": "PyramidKVPress", "knorm": "KnormPress", "quest": None}


def make_press(policy: str, ratio: float):
    """The kvpress press for `policy` removing `ratio` of the prefill KV, or None (dense, or ratio 0:
    an exact no-op)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown KV policy {policy!r}; valid: {', '.join(POLICIES)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"policy_ratio must be in [0, 1), got {ratio!r}")
    if POLICIES[policy] is None or ratio == 0.0:
        return None
    import kvpress   # imported only here: importing it patches transformers' attention functions

    return getattr(kvpress, POLICIES[policy])(compression_ratio=ratio)


@dataclass
class _LayerState:
    config: ARTConfig
    quest_ratio: float = 0.0   # fraction of blocks Quest drops per decode step (0: off)
    visited: int = 0
    candidates: int = 0
    calls: int = 0


@dataclass
class ARTStatsSummary:
    """Totals since enabling (or the last reset): decode calls per layer and blocks visited/candidate."""

    decode_steps: int
    visited_blocks: int
    candidate_blocks: int
    per_layer: dict[int, tuple[int, int]] = field(repr=False)   # layer -> (visited, candidates)

    @property
    def skipped_fraction(self) -> float:
        return 1.0 - self.visited_blocks / self.candidate_blocks if self.candidate_blocks else 0.0


def _art_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state: _LayerState | None = getattr(module, "_sparta_art", None)
    if state is None or query.shape[2] != 1:   # prefill (or a module we did not enable): stock SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    key_mask = None
    if attention_mask is not None:   # (batch, 1, 1, T): bool (True = attend) or additive float
        row = attention_mask[:, 0, -1, : key.shape[2]]
        key_mask = row if row.dtype == torch.bool else row == 0
    budget = None
    if state.quest_ratio:
        n_blocks = math.ceil(key.shape[2] / state.config.block_size)
        budget = max(1, math.ceil((1.0 - state.quest_ratio) * n_blocks))
    out, stats = decode_attention(query, key, value, state.config, key_padding_mask=key_mask, scale=scaling,
                                  block_budget=budget)
    state.calls += 1
    state.visited += int(stats.visited_blocks.sum())
    state.candidates += int(stats.candidate_blocks.sum())
    return out.transpose(1, 2).contiguous(), None


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]


def _configs(model: nn.Module) -> list:
    cfg = model.config
    return [cfg, *(getattr(cfg, n) for n in ("text_config",) if getattr(cfg, n, None) is not None)]


class ARTSession:
    """ART enabled on a model; a context manager that restores the model on exit (or call `disable`)."""

    def __init__(self, model: nn.Module, config: ARTConfig, policy: str = "dense", policy_ratio: float = 0.0):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        press = make_press(policy, policy_ratio)
        layers = _attention_layers(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no attention layers ART can drive "
                             "(supported: Llama-family and Gemma-3 decoders)")
        if any(hasattr(m, "_sparta_art") for m in layers):
            raise ValueError("ART is already enabled on this model; disable it first")
        AttentionInterface.register(IMPLEMENTATION, _art_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)   # same masks as SDPA
        self.model, self.config, self.policy = model, config, policy
        self._layers = layers
        self._previous = [(c, c._attn_implementation) for c in _configs(model)]
        for c, _ in self._previous:
            c._attn_implementation = IMPLEMENTATION
        self._quest_ratio = policy_ratio if policy == "quest" else 0.0
        for m in layers:
            m._sparta_art = _LayerState(config, self._quest_ratio)
        self._final: ARTStatsSummary | None = None
        self._press_ctx = press(model) if press is not None else None   # kvpress: `with press(model)`
        if self._press_ctx is not None:
            self._press_ctx.__enter__()
        model.art_stats = self.stats

    def stats(self) -> ARTStatsSummary:
        if self._final is not None:   # disabled: what was collected until then
            return self._final
        per_layer = {m.layer_idx: (m._sparta_art.visited, m._sparta_art.candidates) for m in self._layers}
        return ARTStatsSummary(
            decode_steps=max((m._sparta_art.calls for m in self._layers), default=0),
            visited_blocks=sum(v for v, _ in per_layer.values()),
            candidate_blocks=sum(c for _, c in per_layer.values()), per_layer=per_layer)

    def reset_stats(self) -> None:
        for m in self._layers:
            m._sparta_art = _LayerState(self.config, self._quest_ratio)

    def disable(self) -> None:
        if self._final is not None:
            return
        self._final = self.stats()
        if self._press_ctx is not None:
            self._press_ctx.__exit__(None, None, None)
        for c, impl in self._previous:
            c._attn_implementation = impl
        for m in self._layers:
            if hasattr(m, "_sparta_art"):
                del m._sparta_art
        if getattr(self.model, "art_stats", None) == self.stats:
            del self.model.art_stats

    def __enter__(self) -> "ARTSession":
        return self

    def __exit__(self, *exc) -> None:
        self.disable()


def enable_art(model: nn.Module, config: ARTConfig, policy: str = "dense", policy_ratio: float = 0.0) -> ARTSession:
    """Decode with ART on `model` on top of a KV policy (`POLICIES`; `policy_ratio` of the prefill KV is
    removed by it); prefill attention stays on SDPA. Use as `with enable_art(model, cfg): ...` or keep
    the session and call `disable()`; `model.art_stats()` reads the collected statistics."""
    return ARTSession(model, config, policy, policy_ratio)

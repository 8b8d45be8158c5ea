"""ART inside Hugging Face transformers: decode steps of an attention layer run `decode_attention`,
prefill stays on SDPA.

The narrowest hook transformers offers is its attention interface: we register one function under our
own name and point the model's config at it while ART is enabled; the function reads its settings from
the attention module it is called for, so nothing global changes behaviour and disabling restores the
model exactly.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from attention import cache as kv_cache
from attention.config import ARTConfig
from attention.kernels.dispatch import decode_attention, resolve

IMPLEMENTATION = "sparta_art"
# KV policies. Prefill policies are kvpress presses (NVIDIA's library; its pinned transformers range
# loads our models). kvpress's H2O (ObservedAttentionPress) needs eager attention weights, so "h2o" is
# our own press on kvpress's base (attention/h2o_press.py). Quest is a decode-time policy built on our
# per-block key bounds: each step keeps the (1 - ratio) best-bounded blocks.
POLICIES = {"dense": None, "streaming": "StreamingLLMPress", "snapkv": "SnapKVPress",
            "pyramidkv": "PyramidKVPress", "knorm": "KnormPress", "h2o": "H2OPress", "quest": None}


def make_press(policy: str, ratio: float):
    """The kvpress press for `policy` removing `ratio` of the prefill KV, or None (dense, or ratio 0:
    an exact no-op)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown KV policy {policy!r}; valid: {', '.join(POLICIES)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"policy_ratio must be in [0, 1), got {ratio!r}")
    if POLICIES[policy] is None or ratio == 0.0:
        return None
    if policy == "h2o":
        from attention.h2o_press import H2OPress   # imports kvpress

        return H2OPress(compression_ratio=ratio)
    import kvpress   # imported only here: importing it patches transformers' attention functions

    return getattr(kvpress, POLICIES[policy])(compression_ratio=ratio)


@contextmanager
def pressed(press, model):
    """`with press(model)` (kvpress), except that sliding-window layers keep their KV: a sliding layer's cache
    holds exactly its window, and transformers' masks assume it. kvpress skips those layers itself only for
    Gemma3ForConditionalGeneration, not for Gemma-3's text-only models."""
    if press is None:
        yield
        return
    sliding = [m for m in model.modules() if getattr(m, "is_sliding", False)]
    with press(model):
        for module in sliding:   # drop the hooks the press just registered on sliding layers
            for key in [k for k, h in module._forward_hooks.items() if getattr(h, "__self__", None) is press]:
                module._forward_hooks.pop(key)
                module._forward_hooks_with_kwargs.pop(key, None)
        yield


@dataclass
class _LayerState:
    config: ARTConfig
    quest_ratio: float = 0.0   # fraction of blocks Quest drops per decode step (0: off)
    impl: str = "auto"         # attention.kernels.dispatch.IMPLS
    visited: int = 0
    candidates: int = 0
    calls: int = 0
    seconds: float = 0.0       # wall time inside decode attention calls
    verify: bool = False       # certified mode: check the error bound against exact attention
    checked: int = 0           # outputs (step x sequence x query head) checked
    violations: int = 0        # of those, errors above the certificate's limit
    worst: float = 0.0         # largest error / that limit


@dataclass
class ARTStatsSummary:
    """Totals since enabling (or the last reset): decode calls per layer and blocks visited/candidate."""

    decode_steps: int
    visited_blocks: int
    candidate_blocks: int
    attention_seconds: float   # wall time of all decode attention calls (every layer, every step)
    per_layer: dict[int, tuple[int, int]] = field(repr=False)   # layer -> (visited, candidates)
    bound_checked: int = 0     # with verify_bound: certified outputs compared with exact attention
    bound_violations: int = 0  # of those, errors above the certificate's limit
    bound_worst: float = 0.0   # largest error / that limit seen

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
        if bool(key_mask.all()):     # nothing masked: the kernels' unmasked path
            key_mask = None
    cfg = state.config
    if not cfg.active and not state.quest_ratio and not state.verify:
        # ART off: exactly stock SDPA (the fair baseline), every candidate block counted as visited
        start = time.perf_counter()
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                        scaling=scaling, **kwargs)
        state.seconds += time.perf_counter() - start
        blocks = math.ceil(key.shape[2] / cfg.block_size) * key.shape[0] * key.shape[1]
        if key_mask is not None:   # blocks holding at least one attendable position
            pad = blocks // (key.shape[0] * key.shape[1]) * cfg.block_size - key.shape[2]
            per_block = torch.nn.functional.pad(key_mask, (0, pad)).view(key.shape[0], -1, cfg.block_size).any(-1)
            blocks = int(per_block.sum()) * key.shape[1]
        state.calls += 1
        state.visited += blocks
        state.candidates += blocks
        return out, None
    budget = bounds = None
    if state.quest_ratio:
        n_blocks = math.ceil(key.shape[2] / cfg.block_size)
        budget = max(1, math.ceil((1.0 - state.quest_ratio) * n_blocks))
    start = time.perf_counter()
    impl = resolve(state.impl, query.device, cfg.block_size, cfg)
    wants_bounds = cfg.uses_bounds or (cfg.active and budget is not None)
    balls = None
    if cfg.uses_ball or cfg.uses_values:   # kept with our cache for the complete blocks, else None
        kept = kv_cache.block_balls(key, value, cfg.block_size, cfg.uses_ball, cfg.uses_values)
        balls = kept[:4] if kept else None
    if impl == "cpu" and cfg.active:   # the lean path: no per-head stats, bounds of new blocks in the kernel
        from attention.kernels.cpu import decode_step

        kept = kv_cache.key_bounds(key, cfg.block_size, partial=False) if wants_bounds else None
        out, visited, candidates = decode_step(
            query, key, value, cfg, scaling if scaling is not None else query.shape[-1] ** -0.5,
            key_padding_mask=key_mask, key_bounds=kept[:2] if kept else None, bounds_done=kept[2] if kept else None,
            block_budget=budget, balls=balls)
    else:
        if wants_bounds:   # kept with our cache, else computed per step from the keys
            kept = kv_cache.key_bounds(key, cfg.block_size)
            bounds = tuple(x[:, :, : kept[2]] for x in kept[:2]) if kept else None
        out, stats = decode_attention(query, key, value, cfg, impl=impl, key_padding_mask=key_mask,
                                      scale=scaling, key_bounds=bounds, block_budget=budget, balls=balls)
        out = out.transpose(1, 2)
        visited, candidates = int(stats.visited_blocks.sum()), int(stats.candidate_blocks.sum())
    state.seconds += time.perf_counter() - start
    if state.verify and cfg.mode == "certified":
        _check_bound(state, query, key, value, key_mask, scaling, bounds, budget, impl, balls)
    state.calls += 1
    state.visited += visited
    state.candidates += candidates
    return out.contiguous(), None


def _check_bound(state: _LayerState, query, key, value, key_mask, scale, bounds, budget, impl, balls=None) -> None:
    """Certified mode's guarantee on this call, in fp32 (outside the timed part): the ART output is within
    its certificate's limit of exact attention over the same candidates (the whole cache without a Quest
    budget): 2 eps max||v|| ("mass"), eps ||o|| ("relative") or eps ("absolute")."""

    cfg = state.config
    q, k, v = query.float(), key.float(), value.float()
    out, _ = decode_attention(q, k, v, cfg, impl=impl, key_padding_mask=key_mask, scale=scale, key_bounds=bounds,
                              block_budget=budget, balls=balls)
    exact, _ = decode_attention(q, k, v, cfg.with_overrides(mode="off"), impl=impl, key_padding_mask=key_mask,
                                scale=scale, key_bounds=bounds, block_budget=budget)
    err = (out - exact).norm(dim=-1).squeeze(-1)                       # (batch, q_heads)
    if cfg.certificate == "mass":
        vnorm = v.norm(dim=-1)
        if key_mask is not None:
            vnorm = vnorm.masked_fill(~key_mask[:, None, :], 0.0)
        limit = 2 * cfg.eps * vnorm.amax(-1).repeat_interleave(q.shape[1] // k.shape[1], 1)
    elif cfg.certificate == "relative":   # relative to the returned output, as the kernel certifies it
        limit = cfg.eps * out.norm(dim=-1).squeeze(-1)
    else:
        limit = torch.full_like(err, cfg.eps)
    ratio = err / limit.clamp_min(1e-30)
    state.checked += ratio.numel()
    state.violations += int((ratio > 1.0).sum())
    state.worst = max(state.worst, float(ratio.max()))


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]


def art_supported(model: nn.Module) -> bool:
    """Whether `enable_art` can drive `model`'s attention (Llama-family and Gemma-3 decoders can; GPT-2's
    attention cannot). Other models still decode with `attention.generate`, with ART off and dense KV."""
    return bool(_attention_layers(model))


def _configs(model: nn.Module) -> list:
    cfg = model.config
    return [cfg, *(getattr(cfg, n) for n in ("text_config",) if getattr(cfg, n, None) is not None)]


class ARTSession:
    """ART enabled on a model; a context manager that restores the model on exit (or call `disable`)."""

    def __init__(self, model: nn.Module, config: ARTConfig, policy: str = "dense", policy_ratio: float = 0.0,
                 impl: str = "auto", verify_bound: bool = False):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        resolve(impl, torch.device("cpu"), config.block_size)   # an unknown name fails here, before any change
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
        self._impl, self._verify = impl, verify_bound
        for m in layers:
            m._sparta_art = _LayerState(config, self._quest_ratio, impl, verify=verify_bound)
        self._final: ARTStatsSummary | None = None
        self._press_ctx = pressed(press, model) if press is not None else None
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
            candidate_blocks=sum(c for _, c in per_layer.values()),
            attention_seconds=sum(m._sparta_art.seconds for m in self._layers), per_layer=per_layer,
            bound_checked=sum(m._sparta_art.checked for m in self._layers),
            bound_violations=sum(m._sparta_art.violations for m in self._layers),
            bound_worst=max((m._sparta_art.worst for m in self._layers), default=0.0))

    def reset_stats(self) -> None:
        for m in self._layers:
            m._sparta_art = _LayerState(self.config, self._quest_ratio, self._impl, verify=self._verify)

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


def enable_art(model: nn.Module, config: ARTConfig, policy: str = "dense", policy_ratio: float = 0.0,
               impl: str = "auto", verify_bound: bool = False) -> ARTSession:
    """Decode with ART on `model` on top of a KV policy (`POLICIES`; `policy_ratio` of the prefill KV is
    removed by it); prefill attention stays on SDPA. Use as `with enable_art(model, cfg): ...` or keep
    the session and call `disable()`; `model.art_stats()` reads the collected statistics.
    impl: the decode kernel ("auto": the CPU kernel on CPU, Triton on CUDA; or "reference").
    Decoding from `attention.new_cache(model)` (pass it as `past_key_values`) appends in place and keeps
    the per-block key summaries that certified mode and Quest need, instead of recomputing them.
    verify_bound: in certified mode, also check every decode call's output against exact fp32 attention
    (within its certificate's limit) and count violations in `art_stats()` (slow: for evaluation, not serving)."""
    return ARTSession(model, config, policy, policy_ratio, impl, verify_bound)

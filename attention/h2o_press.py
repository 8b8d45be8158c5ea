"""H2O heavy hitters as a kvpress press: keep the prefill KV positions that received the most attention.

Imports kvpress (which patches transformers' attention functions on import): import this module only
where a policy is applied, never from `attention/__init__.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import get_prerope_query_states
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half


@dataclass
class H2OPress(ScorerPress):
    """
    H2O: heavy-hitter KV cache compression from accumulated attention mass.

    Each KV position is scored by the attention mass it receives from the prompt's queries, summed over
    the queries and over the query heads that share its KV head (the accumulated attention score of
    H2O; nothing is normalised further). The positions with the lowest mass are pruned.

    Based on H2O, the Heavy-Hitter Oracle (Zhang et al. 2023, https://arxiv.org/abs/2306.14048).

    Unlike ObservedAttentionPress this needs no eager attention weights: the queries are recomputed from
    `hidden_states` (with RoPE, as SnapKVPress does) and their causal softmax attention over the cached
    keys is evaluated `chunk_size` queries at a time, so memory stays at chunk_size x seq_len per head
    however long the prompt. The layer's own attention mask is applied when it is a tensor (padding),
    else a plain causal mask. Scores are accumulated in at least float32.

    H2O keeps recent tokens beside the heavy hitters. Following kvpress's convention (SnapKVPress's
    observation window, LUKVPress's window) the newest `recent_size` positions get the score
    ``max + 1``, so they are always kept and count against the budget; `recent_size=0` leaves the pure
    accumulated mass. Layers whose cache holds fewer positions than the prompt (sliding-window layers,
    e.g. 5 of 6 in Gemma-3) are left uncompressed: their window already bounds them, and the
    attention they saw cannot be rebuilt from the truncated cache.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of key-value pairs to remove during compression.
    window : int or None, default=None
        Score with the last `window` queries of the prompt only; None uses every query (H2O).
    recent_size : int, default=64
        Number of most recent positions always kept.
    chunk_size : int, default=256
        Queries per chunk of the attention recomputation.
    """

    compression_ratio: float = 0.0
    window: int | None = None
    recent_size: int = 64
    chunk_size: int = 256

    def __post_init__(self):
        super().__post_init__()
        assert self.window is None or self.window >= 1, "window must be None or >= 1"
        assert self.recent_size >= 0, "recent_size must be >= 0"
        assert self.chunk_size >= 1, "chunk_size must be >= 1"

    def accumulated_attention(self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor,
                              kwargs) -> torch.Tensor:
        """Attention mass each key receives, summed over the (last `window`) queries and each KV group's
        query heads: (batch, kv_heads, seq_len)."""
        bsz, n_kv, k_len, head_dim = keys.shape
        q_len = hidden_states.shape[1]
        groups = module.config.num_attention_heads // n_kv
        dtype = torch.promote_types(keys.dtype, torch.float32)
        cos, sin = kwargs["position_embeddings"]
        mask = kwargs.get("attention_mask")
        softcap = getattr(module.config, "attn_logit_softcapping", None)
        keys_t = keys.to(dtype).transpose(2, 3)
        scores = torch.zeros(bsz, n_kv, k_len, dtype=dtype, device=keys.device)
        start = 0 if self.window is None else max(0, q_len - self.window)
        for s in range(start, q_len, self.chunk_size):
            e = min(s + self.chunk_size, q_len)
            q = get_prerope_query_states(module, hidden_states[:, s:e])
            c, si = cos[:, s:e].unsqueeze(1), sin[:, s:e].unsqueeze(1)
            q = (q * c + rotate_half(q) * si).to(dtype).view(bsz, n_kv, groups, e - s, head_dim)
            logits = torch.matmul(q, keys_t.unsqueeze(2)) * module.scaling   # (b, kv, g, chunk, k)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            if isinstance(mask, torch.Tensor):   # (b, 1, q, k): bool (True = attend) or additive
                m = mask[:, :, s:e, :k_len].unsqueeze(2)
                logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m
            else:
                positions = torch.arange(k_len, device=keys.device)
                future = positions[None, :] > torch.arange(s, e, device=keys.device)[:, None]
                logits = logits.masked_fill(future, float("-inf"))
            # nan_to_num: a fully masked query row (padding) contributes nothing
            scores += logits.softmax(dim=-1).nan_to_num(0.0).sum(dim=(2, 3))
        return scores

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs,
    ) -> torch.Tensor:
        scores = self.accumulated_attention(module, hidden_states, keys, kwargs)
        if self.recent_size:
            scores[..., -self.recent_size:] = scores.max() + 1
        return scores

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if keys.shape[2] != hidden_states.shape[1]:   # a sliding-window cache: left as it is
            return keys, values
        return super().compress(module, hidden_states, keys, values, attentions, kwargs)

"""Adapter layers. Each wraps a frozen `nn.Linear` as `base_layer` and owns its maths: forward, the
update it adds to the base weight, merging, and the per-segment reset of the chained methods.

Two kinds cover the ten PEFT methods (full fine-tuning needs no layer):
- LowRankLinear: h = W0 x + s B (A x); lora, lora_plus, cola train A and B, asym and rac only B.
- SelectorLinear: A selects r input columns, so W = W0 with those r columns patched; cla, r_cla,
  c3la, r_c3la train B (W[:, idx] = W0[:, idx] + s B), paca trains the columns P themselves
  (W[:, idx] = P). The forward is one GEMM and backward keeps only x[..., idx] alive.
"""
from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from adapters import selectors


class _LastGather(threading.local):
    """The last x[..., idx] gathered, so that q and v, which read the same hidden states through the
    same selector (cla, c3la), save one (..., r) tensor between them instead of two."""

    x = out = None
    version = key = None


_last_gather = _LastGather()


def _gather(x: torch.Tensor, idx: torch.Tensor, key: tuple) -> torch.Tensor:
    c = _last_gather
    if c.x is not None and c.x() is x and c.version == x._version and c.key == key:
        out = c.out()
        if out is not None:
            return out
    out = x.index_select(-1, idx)
    c.x, c.version, c.key, c.out = weakref.ref(x), x._version, key, weakref.ref(out)
    return out


def _patched_weight(weight: torch.Tensor, cols: torch.Tensor, idx: torch.Tensor, scale: float,
                    replace: bool) -> torch.Tensor:
    w = weight.clone()
    if replace:
        w.index_copy_(1, idx, cols.to(w.dtype))
    else:
        w.index_add_(1, idx, cols.to(w.dtype), alpha=scale)
    return w


class _SelectorLinearFn(torch.autograd.Function):
    """y = x W^T + b with W = W0 patched in columns idx (see SelectorLinear).

    Saves only the gathered x[..., idx] (shape (..., r)) as an activation; the patched weight is rebuilt
    in backward from W0 and the columns (an (n, m) copy, cheap next to the (N, n, m) GEMMs) instead of
    being kept alive between forward and backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, cols, idx, scale: float, replace: bool, idx_key: tuple = ()):
        if ctx.needs_input_grad[1]:
            raise RuntimeError("selector adapters keep the base weight frozen")
        w = _patched_weight(weight, cols, idx, scale, replace)
        x_idx = None
        if ctx.needs_input_grad[3]:   # only B's (or P's) gradient needs the input, and only its r columns
            x_idx = _gather(x, idx, idx_key) if idx_key else x.index_select(-1, idx)
        ctx.save_for_backward(x_idx, weight, cols, idx)
        ctx.scale, ctx.replace = scale, replace
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x_idx, weight, cols, idx = ctx.saved_tensors
        grad_x = grad_bias = grad_cols = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ _patched_weight(weight, cols, idx, ctx.scale, ctx.replace)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[3]:
            # (x_idx^T g)^T: the skinny GEMM is ~20% faster in this orientation on CPU
            grad_cols = (x_idx.reshape(-1, x_idx.shape[-1]).t() @ g2).t()
            if not ctx.replace:
                grad_cols = grad_cols * ctx.scale
            grad_cols = grad_cols.to(cols.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        return grad_x, None, grad_bias, grad_cols, None, None, None, None


class AdapterLayer(nn.Module):
    """Common state: the wrapped layer, the method's scale and the seed of its draws."""

    def __init__(self, base_layer: nn.Linear, name: str, rank: int, scale: float, seed: int, selector: str):
        super().__init__()
        self.base_layer = base_layer
        self.name, self.rank, self.scale, self.seed, self.selector = name, rank, scale, seed, selector
        self.segment = 0

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _new(self, *shape) -> torch.Tensor:
        w = self.base_layer.weight
        return torch.zeros(*shape, dtype=w.dtype, device=w.device)

    def trained(self) -> dict[str, nn.Parameter]:
        """The parameters this layer trains in the current segment, by name."""
        return {n: p for n, p in self.named_parameters(recurse=False) if p.requires_grad}

    def delta_weight(self) -> torch.Tensor:
        """W - W0 for the current segment, shape (n, m)."""
        raise NotImplementedError

    def effective_weight(self) -> torch.Tensor:
        return self.base_layer.weight + self.delta_weight()

    @torch.no_grad()
    def merge_into_base(self) -> None:
        self.base_layer.weight += self.delta_weight()

    def reset(self, segment: int) -> None:
        """Start `segment`: draw the fixed factor and zero the update (called after a merge)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, selector={self.selector}, segment={self.segment}"


class LowRankLinear(AdapterLayer):
    """h = W0 x + s B (A x). B starts at 0, A Kaiming-uniform; A trained only if `train_a`."""

    def __init__(self, base_layer, name, rank, scale, seed, train_a: bool):
        super().__init__(base_layer, name, rank, scale, seed, "kaiming")
        self.lora_A = nn.Parameter(self._new(rank, self.in_features), requires_grad=train_a)
        self.lora_B = nn.Parameter(self._new(self.out_features, rank))
        self.reset(0)

    @torch.no_grad()
    def reset(self, segment: int) -> None:
        self.segment = segment
        a = selectors.kaiming_a(self.rank, self.in_features, self.seed, self.name, segment)
        self.lora_A.copy_(a)
        self.lora_B.zero_()

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


class SelectorLinear(AdapterLayer):
    """W = W0 patched in the r selected input columns `idx`.

    columns=False (cla family): trains B (n, r), B = 0 at start; W[:, idx] = W0[:, idx] + s B.
    columns=True (paca): trains P (n, r) = W0[:, idx] at start; W[:, idx] = P. With Adam, paca at
    lr s * eta takes the same column steps as cla at lr eta.
    """

    def __init__(self, base_layer, name, rank, scale, seed, selector: str, columns: bool):
        super().__init__(base_layer, name, rank, scale, seed, selector)
        self.columns = columns
        self.register_buffer("idx", torch.arange(rank, device=base_layer.weight.device))
        if columns:
            self.paca_P = nn.Parameter(self._new(self.out_features, rank))
        else:
            self.lora_B = nn.Parameter(self._new(self.out_features, rank))
        self.reset(0)

    @property
    def cols(self) -> nn.Parameter:
        return self.paca_P if self.columns else self.lora_B

    @torch.no_grad()
    def set_selector(self, idx: torch.Tensor) -> None:
        self.idx = idx.to(device=self.base_layer.weight.device, dtype=torch.long)
        self._key_src = None   # the gather key is re-read from the new buffer at the next forward
        if self.columns:
            self.paca_P.copy_(self.base_layer.weight[:, self.idx])

    @torch.no_grad()
    def reset(self, segment: int) -> None:
        self.segment = segment
        if not self.columns:
            self.lora_B.zero_()
        self.set_selector(selectors.columns(self.selector, self.in_features, self.rank, self.seed,
                                            self.name, segment))

    def delta_weight(self) -> torch.Tensor:
        w0 = self.base_layer.weight
        return _patched_weight(w0, self.cols, self.idx, self.scale, self.columns) - w0

    @torch.no_grad()
    def merge_into_base(self) -> None:
        w0 = self.base_layer.weight
        w0.copy_(_patched_weight(w0, self.cols, self.idx, self.scale, self.columns))

    def _gather_key(self) -> tuple:
        """The values of idx (with its device), which decide whether q and v may share one gather.

        Derived from the buffer itself, not from set_selector: load_state_dict (DeepSpeed's resume) copies
        into idx in place, and a key left from before would let two layers share a stale gather. Re-read
        (one .tolist(), a host sync on GPU) only when the buffer changed: a new tensor, an in-place write
        (its version counter) or a move; otherwise a tuple compare per forward.
        """
        idx = self.idx
        src = (idx.device, idx.data_ptr(), idx._version)
        if self._key_src != src:
            self._key_src, self._key = src, (str(idx.device), *idx.tolist())
        return self._key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The key only matters when the columns' gradient needs the gathered input (training).
        key = self._gather_key() if torch.is_grad_enabled() and self.cols.requires_grad else ()
        return _SelectorLinearFn.apply(x, self.base_layer.weight, self.base_layer.bias, self.cols,
                                       self.idx, self.scale, self.columns, key)

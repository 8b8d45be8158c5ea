"""The injector: finds the target modules, checks them, swaps adapter layers in and can undo it.

Methods never walk the model; `apply` resolves every target first and raises before any weight or
module is touched. GPT-2's fused `c_attn` (a Conv1D producing q, k and v at once) is split into three
`nn.Linear` (`c_attn.q`, `c_attn.k`, `c_attn.v`) so q and v are adapted separately; undoing fuses it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

# Query and value projections per model_type (the paper adapts q and v).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta"), ("query", "value")),
    "deberta-v2": ("query_proj", "value_proj"),
    **dict.fromkeys(("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "gemma3_text"),
                    ("q_proj", "v_proj")),
    "gpt2": ("c_attn.q", "c_attn.v"),
}
_FUSED_QKV = {"gpt2": "c_attn"}


class SplitQKV(nn.Module):
    """GPT-2's fused q/k/v Conv1D (weight (m, 3d), y = x W + b) as three nn.Linear (d, m)."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        m, three_d = conv.weight.shape
        d = three_d // 3
        for i, part in enumerate("qkv"):
            lin = nn.Linear(m, d, device=conv.weight.device, dtype=conv.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(conv.weight[:, i * d:(i + 1) * d].t())
                lin.bias.copy_(conv.bias[i * d:(i + 1) * d])
            lin.weight.requires_grad_(conv.weight.requires_grad)
            lin.bias.requires_grad_(conv.bias.requires_grad)
            setattr(self, part, lin)
        self._conv_cls = type(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def fuse(self) -> nn.Module:
        d, m = self.q.weight.shape
        conv = self._conv_cls(3 * d, m).to(device=self.q.weight.device, dtype=self.q.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(torch.cat([self.q.weight.t(), self.k.weight.t(), self.v.weight.t()], dim=1))
            conv.bias.copy_(torch.cat([self.q.bias, self.k.bias, self.v.bias]))
        conv.weight.requires_grad_(self.q.weight.requires_grad)
        conv.bias.requires_grad_(self.q.bias.requires_grad)
        return conv


@dataclass(frozen=True)
class Target:
    name: str           # module name after any split, e.g. "transformer.h.0.attn.c_attn.q"
    in_features: int
    out_features: int
    fused_parent: str | None = None   # the Conv1D to split first, if any


def _candidates(model: nn.Module, head: tuple[str, ...]) -> list[Target]:
    """Every linear layer that can be adapted (task-head modules excluded: they are trained whole)."""
    fused = _FUSED_QKV.get(getattr(getattr(model, "config", None), "model_type", None))
    out = []
    for name, mod in model.named_modules():
        if name.split(".")[0] in head:
            continue
        if isinstance(mod, nn.Linear):
            out.append(Target(name, mod.in_features, mod.out_features))
        elif fused and name.split(".")[-1] == fused and hasattr(mod, "nf"):   # transformers' Conv1D
            m, three_d = mod.weight.shape
            out += [Target(f"{name}.{p}", m, three_d // 3, fused_parent=name) for p in "qkv"]
    return out


def _matches(name: str, pattern: tuple[str, ...] | str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == t or name.endswith("." + t) for t in pattern)


def default_targets(model: nn.Module) -> tuple[str, ...]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(f"no default targets for model_type {model_type!r}; pass AdapterConfig.targets "
                         f"or use a supported architecture: {', '.join(sorted(DEFAULT_TARGETS))}")
    return DEFAULT_TARGETS[model_type]


def resolve(model: nn.Module, targets, rank: int, head: tuple[str, ...]) -> list[Target]:
    """The modules to adapt, validated: every pattern matches something and r <= every input width."""
    patterns = targets if targets is not None else default_targets(model)
    cands = _candidates(model, head)
    kinds = sorted({c.name.split(".")[-1] if c.fused_parent is None else ".".join(c.name.split(".")[-2:])
                    for c in cands})
    hint = f"adaptable linear layers of this {type(model).__name__} are named: {', '.join(kinds)}"
    if isinstance(patterns, str):
        unmatched = [] if any(_matches(c.name, patterns) for c in cands) else [patterns]
    else:
        unmatched = [p for p in patterns if not any(_matches(c.name, (p,)) for c in cands)]
    if unmatched:
        raise ValueError(f"AdapterConfig.targets: {', '.join(map(repr, unmatched))} matches no module; {hint}")
    chosen = [c for c in cands if _matches(c.name, patterns)]
    for c in chosen:
        if rank > c.in_features:
            raise ValueError(f"AdapterConfig.rank: rank {rank} exceeds the input width {c.in_features} of "
                             f"{c.name!r}; choose rank <= {min(t.in_features for t in chosen)}")
    return chosen


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def split_fused(model: nn.Module, targets: list[Target]) -> list[str]:
    """Split the fused layers the targets live in; returns their names (for `fuse_back`)."""
    parents = sorted({t.fused_parent for t in targets if t.fused_parent})
    for p in parents:
        set_module(model, p, SplitQKV(get_module(model, p)))
    return parents


def fuse_back(model: nn.Module, parents: list[str]) -> None:
    for p in parents:
        set_module(model, p, get_module(model, p).fuse())

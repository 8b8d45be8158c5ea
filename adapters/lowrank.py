"""Every method but full fine-tuning as one low-rank update per module: delta W = scale * B A.

A LoRA-family adapter is its own A and B; a selector adapter (cla, r_cla, c3la, r_c3la, paca) is a LoRA whose
A selects input columns (kept as indices `idx`, so that A x is a gather); a chained adapter stacks its k
segments into one factor pair of rank k r. GPT-2's split q/k/v parts are put back on the fused `c_attn`
(B zero on the rows of parts not adapted), so names are those of the unmodified base model.

Two readers give the same factors: `factors(handle)` from a live adapter and `read_factors(path, model)` from a
saved folder, without touching `model` (it only lends shapes and, for paca, the pretrained columns). The PEFT
export (adapters.peft_format) and multi-adapter serving (adapters.bank) build on them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from adapters import selectors
from adapters.config import AdapterConfig
from adapters.targets import SplitQKV

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LowRank:
    """delta W = scale * B @ A for one module of the base model: B is (n, R); A is (R, m), or None with
    `idx` (R,) the input columns A selects (A = one-hot rows)."""

    B: torch.Tensor
    scale: float
    A: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    in_features: int = 0

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    @property
    def selects(self) -> bool:
        return self.idx is not None

    def dense_a(self) -> torch.Tensor:
        """A as a matrix (R, m): the selection matrix of a selector adapter."""
        if self.A is not None:
            return self.A
        a = torch.zeros(self.rank, self.in_features, dtype=self.B.dtype, device=self.B.device)
        a[torch.arange(self.rank, device=a.device), self.idx.to(a.device)] = 1
        return a

    def delta(self) -> torch.Tensor:
        """delta W (n, m), in float32."""
        return self.scale * (self.B.float() @ self.dense_a().float())

    def to(self, device=None, dtype=None) -> LowRank:
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return replace(self, B=move(self.B), A=move(self.A),
                       idx=None if self.idx is None else self.idx.to(device=device))


def _unwrapped(module: nn.Module) -> nn.Module:
    """The layer under a wrapper that keeps it as `base_layer` (an adapter layer, adapters.bank's module)."""
    return getattr(module, "base_layer", module)


def base_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The (n, m) pretrained weight of target `name` in the unmodified model (a GPT-2 `c_attn.q` part is a
    slice of the fused Conv1D, whose weight is (m, 3d); a whole Conv1D's weight comes transposed)."""
    try:
        module = _unwrapped(model.get_submodule(name))
        return module.weight.t() if hasattr(module, "nf") else module.weight
    except AttributeError:
        pass
    parent, _, part = name.rpartition(".")
    conv = _unwrapped(model.get_submodule(parent)).weight
    d = conv.shape[1] // 3
    i = "qkv".index(part)
    return conv[:, i * d:(i + 1) * d].t()


def fused_part(model: nn.Module, name: str) -> tuple[str, int, int] | None:
    """(fused module, row offset, its rows) when `name` is a split part of a fused q/k/v layer, else None."""
    parent, _, part = name.rpartition(".")
    if part not in ("q", "k", "v") or not parent:
        return None
    try:
        mod = _unwrapped(model.get_submodule(parent))
    except AttributeError:
        return None
    if isinstance(mod, SplitQKV):                      # split in place by a live handle
        d = mod.q.out_features
    elif hasattr(mod, "nf") and mod.weight.ndim == 2:  # transformers' Conv1D, as in the saved base model
        d = mod.weight.shape[1] // 3
    else:
        return None
    return parent, "qkv".index(part) * d, 3 * d


def _segment_factor(config: AdapterConfig, name: str, state: dict[str, torch.Tensor], segment: int,
                    w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(B, A, idx) of one segment in the adapter's scale. A frozen A (asym, rac) is redrawn from its seed."""
    spec, s = config.spec, config.scale
    n, m = w0.shape
    if spec.layer == "low_rank":
        a = state.get("lora_A")
        if a is None:
            a = selectors.kaiming_a(config.rank, m, config.seed, name, segment).to(w0.dtype)
        return state["lora_B"], a.to(w0.device), None
    idx = state["idx"].to(device=w0.device, dtype=torch.long)
    if spec.columns:   # paca trains the columns themselves: W[:, idx] = P, so B = (P - W0[:, idx]) / s
        b = (state["paca_P"].float() - w0[:, idx].float()) / s
        return b.to(w0.dtype), None, idx
    return state["lora_B"], None, idx


def _stack(config: AdapterConfig, name: str, states: list[dict[str, torch.Tensor]], w0: torch.Tensor) -> LowRank:
    parts = [_segment_factor(config, name, st, j, w0) for j, st in enumerate(states)]
    b = torch.cat([p[0].to(w0.device) for p in parts], dim=1)
    if config.spec.layer == "low_rank":
        return LowRank(b, config.scale, A=torch.cat([p[1] for p in parts]), in_features=w0.shape[1])
    return LowRank(b, config.scale, idx=torch.cat([p[2] for p in parts]), in_features=w0.shape[1])


def _fuse(model: nn.Module, per_target: dict[str, LowRank]) -> dict[str, LowRank]:
    """Put the parts of a fused q/k/v layer back on it: factors side by side, B on the part's rows."""
    out: dict[str, LowRank] = {}
    groups: dict[str, list[tuple[int, int, LowRank]]] = {}
    for name, f in per_target.items():
        fused = fused_part(model, name)
        if fused is None:
            out[name] = f
        else:
            parent, offset, rows = fused
            groups.setdefault(parent, []).append((offset, rows, f))
    for parent, parts in groups.items():
        rows = parts[0][1]
        total = sum(f.rank for _, _, f in parts)
        first = parts[0][2]
        b = first.B.new_zeros(rows, total)
        col = 0
        for offset, _, f in parts:
            b[offset:offset + f.B.shape[0], col:col + f.rank] = f.B
            col += f.rank
        if first.selects:
            out[parent] = LowRank(b, first.scale, idx=torch.cat([f.idx for _, _, f in parts]),
                                  in_features=first.in_features)
        else:
            out[parent] = LowRank(b, first.scale, A=torch.cat([f.A for _, _, f in parts]),
                                  in_features=first.in_features)
    return out


def _check_method(config: AdapterConfig) -> None:
    if config.spec.layer == "full":
        raise ValueError("method 'full' trains every weight: it has no low-rank form (serve it merged, or save "
                         "it in sparta's format)")


@torch.no_grad()
def factors(handle) -> dict[str, LowRank]:
    """The low-rank factors of a live adapter (adapters.apply / adapters.load), by base-model module name:
    finished segments of a chained method and the current one, stacked."""
    _check_method(handle.config)
    per_target = {}
    for name, layer in handle.layers.items():
        current = {n: p.detach() for n, p in layer.named_parameters(recurse=False)}
        if hasattr(layer, "idx"):
            current["idx"] = layer.idx
        states = [*handle.history[name], current]
        per_target[name] = _stack(handle.config, name, states, layer.base_layer.weight.detach())
    return _fuse(handle.model, per_target)


def read_meta(path: str | Path) -> dict:
    """A sparta adapter folder's JSON (ValueError for a PEFT folder or another format version)."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}: not a sparta adapter folder")
    meta = json.loads(file.read_text())
    if "peft_type" in meta:
        raise ValueError(f"{path} is a PEFT adapter folder (peft_type {meta['peft_type']}), not sparta's format")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: adapter format {meta.get('format_version')!r}, this sparta reads {FORMAT_VERSION}")
    return meta


@torch.no_grad()
def read_factors(path: str | Path, model: nn.Module) -> tuple[AdapterConfig, dict[str, LowRank]]:
    """The low-rank factors of a saved sparta adapter over `model`, its unmodified base (which is not changed:
    it lends shapes and, for paca, the pretrained columns). Tensors come in the base weights' dtype and device."""
    path = Path(path)
    meta = read_meta(path)
    config = AdapterConfig.from_dict(meta["config"])
    _check_method(config)
    tensors = load_file(str(path / WEIGHTS_FILE))
    per_target = {}
    for name in meta["modules"]:
        try:
            w0 = base_weight(model, name)
        except AttributeError:
            raise ValueError(f"{path}: module {name!r} of the adapter is not in this {type(model).__name__}") from None
        states = []
        for j in range(meta["segment"] + 1):
            prefix = f"adapter.{name}.segment{j}."
            st = {k[len(prefix):]: t.to(device=w0.device, dtype=w0.dtype) for k, t in tensors.items()
                  if k.startswith(prefix)}
            if name in meta.get("selectors", {}):
                st["idx"] = torch.tensor(meta["selectors"][name][j], dtype=torch.long)
            states.append(st)
        f = _stack(config, name, states, w0)
        if f.B.shape[0] != w0.shape[0] or f.in_features != w0.shape[1]:
            raise ValueError(f"{path}: module {name!r} is {f.B.shape[0]}x{f.in_features} in the adapter but "
                             f"{w0.shape[0]}x{w0.shape[1]} in this model: another base model?")
        per_target[name] = f
    return config, _fuse(model, per_target)

"""`apply` and the `Adapter` handle it returns: counts, optimizer groups, chaining, merge, save/load."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapters import targets as injector
from adapters.config import AdapterConfig
from adapters.layers import AdapterLayer, LowRankLinear, SelectorLinear
from adapters.lowrank import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, read_meta
from adapters.peft_format import save_peft

SAVE_FORMATS = ("sparta", "peft")


def chain_boundaries(total_steps: int, segments: int) -> list[int]:
    """Optimizer-step counts after which to call `chain_step`: k equal segments of `total_steps`."""
    return sorted({round(total_steps * j / segments) for j in range(1, segments)} - {0, total_steps})


def _head_modules(model: nn.Module, head: tuple[str, ...]) -> dict[str, nn.Module]:
    return {name: mod for name, mod in model.named_children() if name in head}


def _make_layer(cfg: AdapterConfig, base: nn.Linear, name: str) -> AdapterLayer:
    spec = cfg.spec
    if spec.layer == "low_rank":
        return LowRankLinear(base, name, cfg.rank, cfg.scale, cfg.seed, train_a=spec.train_a)
    return SelectorLinear(base, name, cfg.rank, cfg.scale, cfg.seed, spec.selector, spec.columns)


class Adapter:
    """Handle on a model adapted in place by `apply`."""

    def __init__(self, model: nn.Module, config: AdapterConfig, layers: dict[str, AdapterLayer],
                 fused: list[str]):
        self.model, self.config, self.layers = model, config, layers
        self._fused = fused
        self.segment = 0          # index of the current chain segment
        self.merged = False
        # Finished segments of chained methods: per layer, the trained tensors and selector of each.
        self.history: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in layers}

    # -- what is trained ---------------------------------------------------------------------------
    def head_parameters(self) -> list[nn.Parameter]:
        return [p for m in _head_modules(self.model, self.config.head).values() for p in m.parameters()]

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Parameters trained now, head excluded (for `full`: every non-head weight)."""
        if self.config.method == "full":
            head = {id(p) for p in self.head_parameters()}
            return [p for p in self.model.parameters() if p.requires_grad and id(p) not in head]
        return [p for layer in self.layers.values() for p in layer.trained().values()]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters())

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups. Adapters get no weight decay (lora_plus: lr(B) = ratio * lr(A)); the head
        and full fine-tuning decay their matrices but not biases and norm scales."""
        groups: list[dict] = []

        def add(name, params, lr_, wd):
            if params:
                groups.append({"name": name, "params": params, "lr": lr_, "weight_decay": wd})

        def decayed(name, params):
            add(name, [p for p in params if p.ndim >= 2], lr, weight_decay)
            add(f"{name}_no_decay", [p for p in params if p.ndim < 2], lr, 0.0)

        if self.config.method == "full":
            decayed("full", self.adapter_parameters())
        else:
            b_lr = lr * self.config.lora_plus_ratio if self.config.spec.lora_plus else lr
            trained = [(n, p) for layer in self.layers.values() for n, p in layer.trained().items()]
            add("adapter_A", [p for n, p in trained if n == "lora_A"], lr, 0.0)
            add("adapter_B", [p for n, p in trained if n == "lora_B"], b_lr, 0.0)
            add("adapter_columns", [p for n, p in trained if n == "paca_P"], lr, 0.0)
        decayed("head", self.head_parameters())
        return groups

    # -- chaining ----------------------------------------------------------------------------------
    @torch.no_grad()
    def chain_step(self, optimizer=None) -> None:
        """Segment boundary (cola, rac, c3la, r_c3la): W0 += s B_j A_j, draw A_{j+1}, B_{j+1} = 0, and
        reset the adapter's optimizer state (the head keeps its state). A no-op for other methods.
        The model's function is unchanged by the boundary itself."""
        self._check_live()
        if not self.config.spec.chained:
            return
        for name, layer in self.layers.items():
            self.history[name].append(self._layer_state(layer))
            layer.merge_into_base()
            layer.reset(self.segment + 1)
        self.segment += 1
        if optimizer is not None:
            _reset_state(optimizer, self.adapter_parameters())

    # -- serving -----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the update into the base weights and put the plain layers back (no adapter overhead at
        inference). Returns the model; the handle can no longer train."""
        self._check_live()
        for name, layer in self.layers.items():
            layer.merge_into_base()
        return self.unload()

    def unload(self) -> nn.Module:
        """Put the original layers back without merging the current segment (finished segments of a
        chained method are already in the base weights)."""
        self._check_live()
        for name, layer in self.layers.items():
            injector.set_module(self.model, name, layer.base_layer)
        injector.fuse_back(self.model, self._fused)
        self.layers, self.merged = {}, True
        return self.model

    def _check_live(self) -> None:
        if self.merged:
            raise RuntimeError("this adapter was merged/unloaded; apply a new one to train again")

    # -- files -------------------------------------------------------------------------------------
    @staticmethod
    def _layer_state(layer: AdapterLayer) -> dict[str, torch.Tensor]:
        state = {n: p.detach().clone() for n, p in layer.trained().items()}
        if isinstance(layer, SelectorLinear):
            state["idx"] = layer.idx.detach().clone()
        return state

    def save(self, path: str | Path, format: str = "sparta") -> Path:
        """safetensors (trained tensors only: current and finished segments, head) + JSON.

        format="sparta": sparta's own folder, which `load` reads back exactly. format="peft": a Hugging Face
        PEFT LoRA folder for PEFT, vLLM and other LoRA servers (adapters.peft_format; not for `full`)."""
        if format not in SAVE_FORMATS:
            raise ValueError(f"Adapter.save: unknown format {format!r}; valid formats: "
                             f"{', '.join(map(repr, SAVE_FORMATS))}")
        if format == "peft":
            return save_peft(self, path)
        self._check_live()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        selectors: dict[str, list[list[int]]] = {}
        for name, layer in self.layers.items():
            states = [*self.history[name], self._layer_state(layer)]
            for j, state in enumerate(states):
                for n, t in state.items():
                    if n != "idx":
                        tensors[f"adapter.{name}.segment{j}.{n}"] = t
            if isinstance(layer, SelectorLinear):
                selectors[name] = [s["idx"].tolist() for s in states]
        if self.config.method == "full":
            head = {id(p) for p in self.head_parameters()}
            for n, p in self.model.named_parameters():
                if id(p) not in head:
                    tensors[f"full.{n}"] = p.detach()
        for mod_name, mod in _head_modules(self.model, self.config.head).items():
            for n, p in mod.named_parameters():
                tensors[f"head.{mod_name}.{n}"] = p.detach()
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path / WEIGHTS_FILE))
        cfg = getattr(self.model, "config", None)
        meta = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "modules": list(self.layers),
            "segment": self.segment,
            "selectors": selectors,
            "base_model": {
                "name_or_path": getattr(cfg, "_name_or_path", None),
                "model_type": getattr(cfg, "model_type", None),
                "architectures": getattr(cfg, "architectures", None),
            },
        }
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return path


def _reset_state(optimizer, params: list[nn.Parameter]) -> None:
    # Unwrap DeepSpeed/accelerate-style wrappers down to the torch optimizer that holds the state.
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    for p in params:
        optimizer.state.pop(p, None)


def apply(model: nn.Module, config: AdapterConfig) -> Adapter:
    """Adapt `model` in place with `config.method` and return its handle.

    Freezes every base weight (except for `full`), keeps the task head (`config.head`) trainable and
    wraps the target layers. Every target is resolved and checked before anything is changed.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"apply expects an AdapterConfig, got {type(config).__name__}")
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("this model already carries sparta adapter layers; merge() or unload() the "
                         "existing adapter before applying another")
    spec = config.spec
    chosen = [] if spec.layer == "full" else injector.resolve(model, config.targets, config.rank, config.head)
    for p in model.parameters():
        p.requires_grad_(spec.layer == "full")
    for mod in _head_modules(model, config.head).values():
        mod.requires_grad_(True)
    fused = injector.split_fused(model, chosen)
    layers: dict[str, AdapterLayer] = {}
    for t in chosen:
        layer = _make_layer(config, injector.get_module(model, t.name), t.name)
        injector.set_module(model, t.name, layer)
        layers[t.name] = layer
    return Adapter(model, config, layers, fused)


def load(model: nn.Module, path: str | Path) -> Adapter:
    """Apply a saved adapter to the same base model: replays finished segments, restores the current
    one and the head, and reproduces the fine-tuned outputs."""
    path = Path(path)
    meta = read_meta(path)
    config = AdapterConfig.from_dict(meta["config"])
    tensors = load_file(str(path / WEIGHTS_FILE))
    handle = apply(model, config)
    if list(handle.layers) != meta["modules"]:
        missing = sorted(set(meta["modules"]) ^ set(handle.layers))
        raise ValueError(f"{path}: adapter modules do not match this model (differ: {missing[:5]})")
    with torch.no_grad():
        for name, layer in handle.layers.items():
            sel = meta["selectors"].get(name)
            for j in range(meta["segment"] + 1):
                if j:
                    layer.reset(j)
                if sel is not None:
                    layer.set_selector(torch.tensor(sel[j]))
                for n, p in layer.trained().items():
                    p.copy_(tensors[f"adapter.{name}.segment{j}.{n}"])
                if j < meta["segment"]:
                    handle.history[name].append(handle._layer_state(layer))
                    layer.merge_into_base()
        handle.segment = meta["segment"]
        params = dict(model.named_parameters())
        for key, t in tensors.items():
            if key.startswith("full."):
                params[key[len("full."):]].copy_(t)
            elif key.startswith("head."):
                params[key[len("head."):]].copy_(t)
    return handle

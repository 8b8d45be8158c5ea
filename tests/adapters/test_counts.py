"""Trainable-parameter counts against the oracle table of specs/adaptation-methods.md (q and v, r = 16,
head excluded). Shapes come from configs on the meta device: nothing is downloaded or allocated."""
import pytest
import torch
import transformers as tf

from adapters import METHODS, AdapterConfig, apply

SHAPES = {
    "bert-base": tf.BertConfig(),
    "roberta-base": tf.RobertaConfig(),
    "gpt2-small": tf.GPT2Config(),
    "roberta-large": tf.RobertaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                      intermediate_size=4096),
    "tinyllama-1.1b": tf.LlamaConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                                     num_key_value_heads=4, intermediate_size=5632, vocab_size=32000),
}
# (lora / lora_plus / cola per segment, asym / rac / cla / r_cla / c3la / r_c3la / paca)
ORACLE = {
    "bert-base": (589_824, 294_912),
    "roberta-base": (589_824, 294_912),
    "gpt2-small": (589_824, 294_912),
    "roberta-large": (1_572_864, 786_432),
    "tinyllama-1.1b": (2_252_800, 811_008),
}
DENSE = {"lora", "lora_plus", "cola"}


def meta_model(shape):
    with torch.device("meta"):
        return tf.AutoModelForSequenceClassification.from_config(SHAPES[shape])


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_counts_match_oracle(shape, method):
    h = apply(meta_model(shape), AdapterConfig(method=method, rank=16))
    two_factor, one_factor = ORACLE[shape]
    assert h.num_trainable() == (two_factor if method in DENSE else one_factor)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_full_counts_every_weight_but_the_head(shape):
    model = meta_model(shape)
    head = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("classifier", "score"))
    total = sum(p.numel() for p in model.parameters())
    h = apply(model, AdapterConfig(method="full"))
    assert head > 0 and h.num_trainable() == total - head


def test_chained_counts_stay_per_segment():
    h = apply(meta_model("bert-base"), AdapterConfig(method="cola", rank=16))
    h.chain_step()
    assert h.num_trainable() == ORACLE["bert-base"][0]

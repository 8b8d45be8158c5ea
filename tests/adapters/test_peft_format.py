"""adapters.peft_format: every method but full, saved with format="peft", loads in Hugging Face PEFT and gives
sparta's outputs. Adapters are perturbed first (B = 0 at init would make an untouched adapter a no-op), and
the outputs must differ from the base model's, so a file PEFT silently ignores fails the test."""
import copy
import json

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import adapters
from adapters import METHODS, AdapterConfig, apply
from workers.data.assets import tiny_config
from tests.helpers import trained_adapter

RANK, ALPHA = 4, 5.0          # s = 1.25: PEFT's lora_alpha / r must come out as s, not its default
ATOL = 1e-5
LOW_RANK = [m for m, s in METHODS.items() if s.layer != "full"]


def causal_lm(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def classifier(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.AutoModelForSequenceClassification.from_config(tiny_config(arch, num_labels=3)).eval()


def ids_for(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, model.config.vocab_size, (2, 10), generator=g)


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(ids).logits


def trained(model, config: AdapterConfig):
    """A copy of the base (kept unmodified for PEFT) and the adapted, perturbed model's handle (two segments
    for a chained method: the export must stack both)."""
    base = copy.deepcopy(model)
    h = trained_adapter(model, config)
    assert h.segment == (1 if config.spec.chained else 0)
    return base, h


def exported_logits(base, folder, ids) -> torch.Tensor:
    pm = peft.PeftModel.from_pretrained(base, folder).eval()
    # PEFT's own view of its adapter must be exactly the file: nothing ignored, nothing missing.
    file_keys = set(load_file(str(folder / "adapter_model.safetensors")))
    assert set(peft.get_peft_model_state_dict(pm)) == file_keys
    return logits(pm, ids)


def check_same_outputs(model, base, h, tmp_path) -> dict:
    ids = ids_for(model)
    plain = logits(base, ids)
    ours = logits(model, ids)
    folder = h.save(tmp_path / "peft", format="peft")
    theirs = exported_logits(base, folder, ids)
    assert (ours - plain).abs().max() > 1e-2, "the adapter does nothing: the test could not fail"
    torch.testing.assert_close(theirs, ours, rtol=0, atol=ATOL)
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.mark.parametrize("method", LOW_RANK)
def test_every_method_loads_in_peft_with_the_same_logits(tmp_path, method):
    model = causal_lm("llama")
    base, h = trained(model, AdapterConfig(method=method, rank=RANK, alpha=ALPHA))
    cfg = check_same_outputs(model, base, h, tmp_path)
    segments = 2 if METHODS[method].chained else 1
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == segments * RANK and cfg["lora_alpha"] / cfg["r"] == pytest.approx(ALPHA / RANK)
    assert cfg["target_modules"] == list(h.layers) and "rank_pattern" not in cfg
    assert cfg["fan_in_fan_out"] is False and cfg["modules_to_save"] is None
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.shape == (segments * RANK, 32) and a.dtype == torch.float32
    if METHODS[method].layer == "selector":   # A is a 0/1 selection matrix: one 1 per row
        assert set(a.unique().tolist()) == {0.0, 1.0} and (a.sum(1) == 1).all()


@pytest.mark.parametrize("method,targets", [
    ("lora", None),
    ("r_cla", None),
    # q and v adapted in layer 0 but only q in layer 1: c_attn ranks 2r and r, so rank_pattern is needed
    ("c3la", r"transformer\.h\.0\.attn\.c_attn\.[qv]|transformer\.h\.1\.attn\.c_attn\.q"),
])
def test_gpt2_fused_c_attn(tmp_path, method, targets):
    model = causal_lm("gpt2")
    base, h = trained(model, AdapterConfig(method=method, rank=RANK, alpha=ALPHA, targets=targets))
    cfg = check_same_outputs(model, base, h, tmp_path)
    assert cfg["fan_in_fan_out"] is True
    assert cfg["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    if targets is None:
        assert cfg["r"] == 2 * RANK and "rank_pattern" not in cfg    # q and v parts side by side
    else:
        ranks = {4 * RANK, 2 * RANK}   # two segments each: q+v in layer 0, q alone in layer 1
        assert {cfg["r"], *cfg["rank_pattern"].values()} == ranks
        for key, r in cfg["rank_pattern"].items():
            assert cfg["alpha_pattern"][key] / r == pytest.approx(ALPHA / RANK)


@pytest.mark.parametrize("method", ["lora", "cla"])
def test_classifier_head_goes_in_modules_to_save(tmp_path, method):
    model = classifier("roberta")
    base, h = trained(model, AdapterConfig(method=method, rank=RANK, alpha=ALPHA))
    cfg = check_same_outputs(model, base, h, tmp_path)
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    torch.testing.assert_close(tensors["base_model.model.classifier.out_proj.weight"],
                               model.classifier.out_proj.weight, rtol=0, atol=0)


def test_full_has_no_peft_form(tmp_path):
    h = apply(causal_lm("llama"), AdapterConfig(method="full"))
    with pytest.raises(ValueError, match="'full'.*no low-rank form"):
        h.save(tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()


def test_unknown_format_names_the_choices(tmp_path):
    h = apply(causal_lm("llama"), AdapterConfig(method="lora", rank=RANK))
    with pytest.raises(ValueError, match=r"'onnx'.*'sparta', 'peft'"):
        h.save(tmp_path / "x", format="onnx")


def test_sparta_load_refuses_a_peft_folder(tmp_path):
    h = apply(causal_lm("llama"), AdapterConfig(method="cla", rank=RANK))
    h.save(tmp_path / "peft", format="peft")
    with pytest.raises(ValueError, match="is a PEFT adapter folder"):
        adapters.load(causal_lm("llama"), tmp_path / "peft")

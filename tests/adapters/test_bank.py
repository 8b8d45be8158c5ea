"""adapters.bank: many adapters over one base, per token. Each token's output equals its own merged model's
(fp32), whatever mix of adapters, base tokens and layouts (slices of one adapter, single tokens of many) the
batch holds; slots can be replaced, cleared and grown to a larger rank."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import adapters
from adapters.bank import AdapterBank, Routing
from adapters.lowrank import factors
from workers.data.assets import tiny_config
from tests.helpers import trained_adapter


def perturbed(base, method: str, seed: int, rank: int = 4):
    """(factors, merged model) of an adapter with random trained tensors (B = 0 would change nothing)."""
    handle = trained_adapter(copy.deepcopy(base), adapters.AdapterConfig(method=method, rank=rank, seed=seed,
                                                                          chain_segments=2), seed)
    f = factors(handle)
    return f, handle.merge().eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request):
    torch.manual_seed(0)
    base = tf.AutoModelForCausalLM.from_config(tiny_config(request.param)).eval()
    made = [perturbed(base, m, seed) for seed, m in enumerate(("lora", "cla", "c3la", "paca", "rac"), start=1)]
    served = copy.deepcopy(base)
    bank = AdapterBank(served, len(made))
    for slot, (f, _) in enumerate(made):
        bank.put(slot, f)
    return base, made, served, bank


def reference(base, made, slot):
    return base if slot is None else made[slot][1]


@torch.no_grad()
def test_single_tokens_of_many_adapters_in_one_forward(setup):
    base, made, served, bank = setup
    slots = [0, 1, None, 2, 3, 4, 1, None]
    ids = torch.randint(3, base.config.vocab_size, (len(slots), 1), generator=torch.Generator().manual_seed(1))
    with bank.route(Routing.packed([(s, i, 1) for i, s in enumerate(slots)], bank, "cpu")):
        got = served(ids).logits
    for i, s in enumerate(slots):
        want = reference(base, made, s)(ids[i:i + 1]).logits
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=0)
    plain = base(ids).logits
    assert all((got[i] - plain[i]).abs().max() > 1e-3 for i, s in enumerate(slots) if s is not None)


@torch.no_grad()
def test_slices_of_one_adapter_and_uniform_routing(setup):
    base, made, served, bank = setup
    L, slots = 6, [3, None, 0, 2]
    ids = torch.randint(3, base.config.vocab_size, (len(slots), L), generator=torch.Generator().manual_seed(2))
    with bank.route(Routing.packed([(s, b * L, L) for b, s in enumerate(slots)], bank, "cpu")):
        got = served(ids).logits   # (4, 6) tokens: each row one adapter's run
    for b, s in enumerate(slots):
        torch.testing.assert_close(got[b:b + 1], reference(base, made, s)(ids[b:b + 1]).logits, atol=1e-5, rtol=0)
    for s in (1, None):
        with bank.route(Routing.uniform(s)):
            torch.testing.assert_close(served(ids).logits, reference(base, made, s)(ids).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(served(ids).logits, base(ids).logits, atol=0, rtol=0)   # no routing: the base


@torch.no_grad()
def test_replace_clear_and_grow_a_slot(setup):
    base, made, _, _ = setup
    served = copy.deepcopy(base)
    bank = AdapterBank(served, 2)
    bank.put(0, made[0][0])
    bank.put(1, made[1][0])
    wide, wide_model = perturbed(base, "lora", 9, rank=12)   # rank 12 > 4: the stacks grow
    bank.put(0, wide)
    ids = torch.randint(3, base.config.vocab_size, (2, 1), generator=torch.Generator().manual_seed(3))
    with bank.route(Routing.packed([(0, 0, 1), (1, 1, 1)], bank, "cpu")):
        got = served(ids).logits
    torch.testing.assert_close(got[:1], wide_model(ids[:1]).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1:], made[1][1](ids[1:]).logits, atol=1e-5, rtol=0)
    bank.clear(1)
    with bank.route(Routing.uniform(1)):
        torch.testing.assert_close(served(ids).logits, base(ids).logits, atol=1e-6, rtol=0)


def test_factors_of_another_model_are_refused(setup):
    base, made, _, _ = setup
    other = tf.AutoModelForCausalLM.from_config(tiny_config("qwen2", hidden_size=48)).eval()
    with pytest.raises(ValueError, match="another base model"):
        AdapterBank(other, 1).put(0, made[0][0])


@torch.no_grad()
def test_a_bf16_model_adds_float32_factors():
    torch.manual_seed(0)
    base = tf.AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    f, merged = perturbed(base, "lora", 1)
    served = copy.deepcopy(base).to(torch.bfloat16)
    bank = AdapterBank(served, 1)
    bank.put(0, f)
    module = next(iter(bank.modules.values()))
    assert module.A.dtype == torch.float32 and module.base_layer.weight.dtype == torch.bfloat16
    ids = torch.randint(3, base.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(4))
    with bank.route(Routing.uniform(0)):
        got = served(ids).logits.float()
    want, plain = merged(ids).logits, base(ids).logits
    assert (got - want).abs().max() < 0.25 * (want - plain).abs().max()   # bf16 rounding, far below the adapter's effect

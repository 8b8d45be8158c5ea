"""workers.serving.sampling on CPU: greedy and degenerate settings against argmax, seeded reproducibility inside
and outside a batch, sampled frequencies against the exact distributions, penalties, logprobs and validation."""
from __future__ import annotations

import math

import pytest
import torch

from workers.serving.requests import RequestError
from workers.serving.sampling import (GREEDY, SamplingParams, SequenceSampler, TokenLogprobs, apply_penalties,
                                      sample, sampling_params)

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
DRAWS = 20_000


def samplers(params: SamplingParams, n: int, vocab: int) -> list[SequenceSampler]:
    return [SequenceSampler(params, vocab, "cpu", index=i) for i in range(n)]


def random_logits(m: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(m, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def decode(logits_per_step: list[torch.Tensor], seqs: list[SequenceSampler]) -> list[list[int]]:
    """Tokens per step for a batch, recording each as the engine would."""
    steps = []
    for logits in logits_per_step:
        tokens, _ = sample(logits, seqs)
        for seq, token in zip(seqs, tokens.tolist()):
            seq.record(token)
        steps.append(tokens.tolist())
    return steps


# -- argmax cases ------------------------------------------------------------------------------------
def test_greedy_is_argmax_and_draws_nothing():
    logits = random_logits(8, 100, seed=0)
    seqs = samplers(GREEDY, 8, 100)
    before = [s.generator.get_state() for s in seqs]
    tokens, logprobs = sample(logits, seqs)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    assert logprobs == [None] * 8
    assert all(torch.equal(b, s.generator.get_state()) for b, s in zip(before, seqs))


@pytest.mark.parametrize("temperature", [0.1, 1.0, 2.0])
def test_top_k_1_is_argmax_at_any_temperature(temperature):
    logits = random_logits(16, 200, seed=1)
    tokens, _ = sample(logits, samplers(SamplingParams(temperature=temperature, top_k=1, seed=3), 16, 200))
    assert tokens.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_tiny_top_p_is_argmax(temperature):
    logits = random_logits(16, 200, seed=2)
    tokens, _ = sample(logits, samplers(SamplingParams(temperature=temperature, top_p=1e-9, seed=4), 16, 200))
    assert tokens.tolist() == logits.argmax(-1).tolist()


# -- seeds and batch invariance ----------------------------------------------------------------------
TARGETS = [SamplingParams(seed=7), SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=7),
           SamplingParams(temperature=1.3, frequency_penalty=0.5, presence_penalty=0.2, seed=7)]
NEIGHBOURS = [SamplingParams(temperature=0.7, top_p=0.5, seed=1), GREEDY, SamplingParams(top_k=5),
              SamplingParams(temperature=1.5, presence_penalty=1.0, logprobs=3, seed=2)]


@pytest.mark.parametrize("target", TARGETS, ids=["plain", "top_k_top_p", "penalties"])
def test_seed_reproducible_alone_and_anywhere_in_a_batch(target):
    vocab, steps = 300, 6
    own = [random_logits(1, vocab, seed=100 + i) for i in range(steps)]
    alone = [row[0] for row in decode(own, [SequenceSampler(target, vocab, "cpu")])]
    assert alone == [row[0] for row in decode(own, [SequenceSampler(target, vocab, "cpu")])]
    for position in (0, 2, 4):
        params = NEIGHBOURS[:position] + [target] + NEIGHBOURS[position:]
        seqs = [SequenceSampler(p, vocab, "cpu") for p in params]
        batch = [torch.cat([random_logits(position, vocab, seed=200 + i), own[i],
                            random_logits(len(params) - position - 1, vocab, seed=300 + i)]) for i in range(steps)]
        assert [row[position] for row in decode(batch, seqs)] == alone


def test_different_seeds_indices_or_no_seed_give_different_sequences():
    # Uniform over 50k tokens: two independent 5-token sequences coincide with probability 50_000**-5 ≈ 3e-24.
    vocab, steps = 50_000, 5
    uniform = [torch.zeros(1, vocab)] * steps

    def run(params: SamplingParams, index: int = 0) -> list[list[int]]:
        return decode(uniform, [SequenceSampler(params, vocab, "cpu", index=index)])

    seeded = SamplingParams(seed=1)
    assert run(seeded) == run(seeded)
    assert run(seeded) != run(SamplingParams(seed=2))
    assert run(seeded, index=0) != run(seeded, index=1)
    assert run(SamplingParams()) != run(SamplingParams())


# -- the sampled distribution ------------------------------------------------------------------------
def frequencies(params: SamplingParams, probs: torch.Tensor = PROBS) -> torch.Tensor:
    """Empirical token frequencies of DRAWS independent rows (seeded, one per index) over log(probs)."""
    vocab = len(probs)
    tokens, _ = sample(probs.log().expand(DRAWS, vocab), samplers(params, DRAWS, vocab))
    return torch.bincount(tokens, minlength=vocab).double() / DRAWS


def assert_matches(observed: torch.Tensor, expected: list[float]):
    """Within 5 binomial standard errors, sqrt(p (1 - p) / N), per token; exactly zero where p = 0."""
    for token, (f, p) in enumerate(zip(observed.tolist(), expected)):
        if p == 0:
            assert f == 0, f"token {token} was sampled though its probability is 0"
        else:
            assert abs(f - p) <= 5 * math.sqrt(p * (1 - p) / DRAWS), f"token {token}: {f:.4f} vs {p:.4f}"


def test_temperature_1_samples_softmax():
    assert_matches(frequencies(SamplingParams(temperature=1.0, seed=11)), PROBS.tolist())


def test_temperature_sharpens():
    # softmax(log p / 0.5) = p^2 / sum(p^2)
    squared = PROBS ** 2
    assert_matches(frequencies(SamplingParams(temperature=0.5, seed=12)), (squared / squared.sum()).tolist())


def test_top_k_renormalises_over_the_top_two():
    assert_matches(frequencies(SamplingParams(top_k=2, seed=13)), [0.625, 0.375, 0.0, 0.0])


def test_top_p_keeps_the_smallest_set_reaching_it():
    # 0.5 + 0.3 >= 0.8: exactly {0, 1}; at 0.81 the third token is needed too.
    assert_matches(frequencies(SamplingParams(top_p=0.8, seed=14)), [0.625, 0.375, 0.0, 0.0])
    assert_matches(frequencies(SamplingParams(top_p=0.81, seed=15)), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])


def test_top_p_boundary_survives_float32_rounding():
    # In float32 softmax(log p) sums 0.35 + 0.33 to 0.67999995 < 0.68: exactly reaching top_p must still stop there.
    probs = torch.tensor([0.35, 0.33, 0.32])
    assert_matches(frequencies(SamplingParams(top_p=0.68, seed=17), probs), [0.35 / 0.68, 0.33 / 0.68, 0.0])


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # Over the top 3 renormalised (0.526, 0.316, 0.158) the first two hold 0.842 >= 0.82, so the third goes;
    # over the raw probabilities they hold only 0.8 and it would stay.
    assert_matches(frequencies(SamplingParams(top_k=3, top_p=0.82, seed=16)), [0.625, 0.375, 0.0, 0.0])


# -- penalties ---------------------------------------------------------------------------------------
def test_penalties_follow_openai_formula():
    seq = SequenceSampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), 6, "cpu")
    for token in (1, 1, 3, 1, 5):
        seq.record(token)
    assert seq.counts.tolist() == [0, 3, 0, 1, 0, 1]
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    penalised = apply_penalties(logits, seq.counts[None], torch.tensor([0.5]), torch.tensor([0.25]))
    # count * 0.25 + (count > 0) * 0.5 off tokens 1 (3x), 3 and 5 (1x each)
    assert penalised.tolist() == [[1.0, 0.75, 3.0, 3.25, 5.0, 5.25]]


def test_penalties_steer_greedy_and_leave_others_alone():
    logits = torch.tensor([[0.0, 1.0, 0.9], [0.0, 1.0, 0.9], [0.0, 0.9, 1.0]])
    penalised = SequenceSampler(SamplingParams(temperature=0.0, frequency_penalty=0.1), 3, "cpu")
    plain = SequenceSampler(GREEDY, 3, "cpu")
    encouraged = SequenceSampler(SamplingParams(temperature=0.0, presence_penalty=-0.2), 3, "cpu")
    for token in (1, 1):
        for seq in (penalised, plain, encouraged):
            seq.record(token)
    assert plain.counts is None
    tokens, _ = sample(logits, [penalised, plain, encouraged])
    # 1.0 - 2 * 0.1 = 0.8 < 0.9; 0.9 + 0.2 = 1.1 > 1.0
    assert tokens.tolist() == [2, 1, 1]


# -- logprobs ----------------------------------------------------------------------------------------
def test_logprobs_are_the_raw_distribution():
    logits = random_logits(4, 50, seed=5)
    params = [SamplingParams(temperature=0.0, logprobs=5),
              SamplingParams(temperature=0.7, top_k=10, logprobs=0, seed=1),
              SamplingParams(seed=2),
              SamplingParams(temperature=1.5, frequency_penalty=2.0, logprobs=20, seed=3)]
    seqs = [SequenceSampler(p, 50, "cpu") for p in params]
    seqs[3].record(int(logits[3].argmax()))
    tokens, logprobs = sample(logits, seqs)
    raw = torch.log_softmax(logits, dim=-1)
    assert logprobs[2] is None
    for row in (0, 1, 3):
        lp = logprobs[row]
        assert isinstance(lp, TokenLogprobs) and lp.token == tokens[row].item()
        assert lp.logprob == pytest.approx(raw[row, lp.token].item(), abs=1e-6)
        k = params[row].logprobs
        values, ids = raw[row].sort(descending=True)
        assert [t for t, _ in lp.top] == ids[:k].tolist()
        assert [v for _, v in lp.top] == pytest.approx(values[:k].tolist(), abs=1e-6)
    assert logprobs[1].top == [] and len(logprobs[3].top) == 20


def test_half_precision_logits_sample_in_fp32():
    logits = random_logits(3, 64, seed=6).to(torch.bfloat16)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=9, logprobs=2)
    tokens, logprobs = sample(logits, samplers(params, 3, 64))
    expected, expected_logprobs = sample(logits.float(), samplers(params, 3, 64))
    assert tokens.tolist() == expected.tolist() and logprobs == expected_logprobs


def test_logits_must_match_the_batch():
    with pytest.raises(ValueError, match="shape"):
        sample(torch.zeros(2, 10), samplers(GREEDY, 3, 10))


# -- SamplingParams ----------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,range_text", [
    ("temperature", 2.5, "[0, 2]"), ("temperature", -0.1, "[0, 2]"), ("temperature", float("nan"), "[0, 2]"),
    ("temperature", True, "[0, 2]"), ("temperature", "1", "[0, 2]"),
    ("top_p", 0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"),
    ("top_k", -1, ">= 0"), ("top_k", 1.5, ">= 0"),
    ("logprobs", 21, "[0, 20]"), ("logprobs", -1, "[0, 20]"), ("logprobs", True, "[0, 20]"),
    ("presence_penalty", 3, "[-2, 2]"), ("frequency_penalty", -2.5, "[-2, 2]"),
    ("seed", 1.5, "integer"),
])
def test_invalid_params_name_field_and_range(field, value, range_text):
    with pytest.raises(RequestError) as error:
        SamplingParams(**{field: value})
    assert error.value.param == field
    assert field in error.value.message and range_text in error.value.message


def test_params_defaults_and_coercion():
    assert GREEDY.greedy and not SamplingParams().greedy
    params = SamplingParams(temperature=1, top_p=1, presence_penalty=-2, frequency_penalty=2, logprobs=20)
    assert isinstance(params.temperature, float) and params.temperature == 1.0
    assert SamplingParams(top_p=1e-9, logprobs=0, seed=-(2 ** 70)).logprobs == 0


def test_sampling_params_fills_left_out_values_from_defaults():
    defaults = SamplingParams(temperature=0.7, top_p=0.9, seed=5)
    params = sampling_params({"temperature": None, "top_p": 0.5, "logprobs": 3, "seed": None}, defaults)
    assert params == SamplingParams(temperature=0.7, top_p=0.5, seed=5, logprobs=3)
    assert sampling_params({}, GREEDY) == GREEDY
    with pytest.raises(RequestError) as error:
        sampling_params({"top_p": 0.0}, defaults)
    assert error.value.param == "top_p"
    with pytest.raises(RequestError) as error:
        sampling_params({"min_p": 0.1}, defaults)
    assert error.value.param == "min_p"

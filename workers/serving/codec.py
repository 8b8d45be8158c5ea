"""Text <-> tokens for the serving engines: the tokenizer (a Hugging Face one, or the byte tokenizer of the
tiny random models), chat prompts, and `TextStream`, which turns a sequence's tokens into text as they come,
with stop strings and streamed pieces."""
from __future__ import annotations

BYTES = "bytes"   # the tokenizer name of workers.data.datasets.ByteTokenizer (what the tiny random models train with)


# -- text <-> tokens -------------------------------------------------------------------------------
class Codec:
    """Text and chat messages <-> token ids: a Hugging Face tokenizer, or the byte tokenizer of
    workers.data.datasets for the tiny random models. Chat uses the tokenizer's template when it has one, else
    a plain "role: content" transcript ending in "assistant:"."""

    def __init__(self, tokenizer, model_eos: list[int] | None = None):
        self.tok = tokenizer
        self.hf = hasattr(tokenizer, "apply_chat_template")   # else the byte tokenizer
        eos = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
        self.eos_ids = frozenset(eos | set(model_eos or ()))
        self.pad_id = getattr(tokenizer, "pad_token_id", None)
        if self.pad_id is None:
            self.pad_id = min(self.eos_ids) if self.eos_ids else 0
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def __len__(self) -> int:
        return len(self.tok) if self.hf else 256

    def encode(self, text: str) -> list[int]:
        if self.hf:
            return list(self.tok(text, add_special_tokens=True)["input_ids"])
        return self.tok.encode(text, add_special_tokens=False)

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        if self.has_template:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # The template spells out its own special tokens (<bos>, <|im_start|>): add none twice.
            return list(self.tok(text, add_special_tokens=False)["input_ids"])
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(name: str | None, model_tokenizer=None):
    """The tokenizer a replica uses (see EngineConfig.tokenizer)."""
    if name is None and model_tokenizer is not None:
        return model_tokenizer
    if name is None or name == BYTES:
        from workers.data.datasets import ByteTokenizer

        return ByteTokenizer()
    import transformers as tf

    from workers.data.assets import resolve_model_path

    return tf.AutoTokenizer.from_pretrained(resolve_model_path(name), local_files_only=True)


class TextStream:
    """One sequence's completion as it grows: `push(token)` takes the next generated token and returns the
    text that became final with it ("" while it is held back); `finish` is set once the sequence ends:
    "stop" (an end-of-sequence token or a stop string) or "length" (`max_tokens` reached). Held back: an
    unfinished UTF-8 character (decoded as U+FFFD) and a tail that could be the start of a stop string.
    `text` is the completion so far, cut before a stop string; `tokens` includes the one that ended it."""

    def __init__(self, codec: Codec, max_tokens: int, stop: tuple[str, ...] = ()):
        self.codec, self.max_tokens, self.stop = codec, max_tokens, stop
        self.tokens: list[int] = []
        self.text, self.sent = "", 0
        self.finish: str | None = None

    def push(self, token: int) -> str:
        if self.finish is not None:
            return ""
        self.tokens.append(token)
        if token in self.codec.eos_ids:
            return self.end("stop")
        text = self.codec.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            return self.end("stop")
        self.text = text
        if len(self.tokens) >= self.max_tokens:
            return self.end("length")
        return self._emit(self._stable_end(text))

    def end(self, reason: str) -> str:
        """Finish now (`reason`: stop, length, cancelled): the rest of the text is final."""
        self.finish = reason
        return self._emit(len(self.text))

    def _stable_end(self, text: str) -> int:
        end = len(text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end -= k
                    break
        return end

    def _emit(self, end: int) -> str:
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

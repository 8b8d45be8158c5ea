"""Passkey prompts as token ids: exact lengths, the needle at the asked depth, with and without a chat
template."""
import pytest
import transformers as tf

from workers.data import haystack
from workers.data.assets import resolve_model_path
from workers.data.haystack import NEEDLE, passkey_ids

TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module", params=["plain", "chat"])
def tokenizer(request):
    tok = tf.AutoTokenizer.from_pretrained(resolve_model_path("minilm-l6"), local_files_only=True)
    tok.chat_template = TEMPLATE if request.param == "chat" else None
    return tok


def _find(ids, part):
    return next(i for i in range(len(ids) - len(part) + 1) if ids[i : i + len(part)] == part)


def check_prompt(tok, total, depth, key, start=0):
    ids = passkey_ids(tok, total, depth, key, haystack_start=start)
    assert len(ids) == total
    text = tok.decode(ids)
    assert text.count(key) == 2 and "pass key?" in text   # the needle says it twice, then the question
    before, after = haystack._frame_ids(tok)
    needle = tok(NEEDLE.format(passkey=key), add_special_tokens=False)["input_ids"]
    n_hay = total - len(before) - len(needle) - len(after)
    at = _find(ids, needle) - len(before)
    # at the asked depth of the haystack, moved back at most 32 tokens to a sentence end
    assert depth * n_hay - 33 <= at <= depth * n_hay + 1, (at, depth, n_hay)
    assert ids[: len(before)] == before and ids[len(ids) - len(after):] == after
    return ids


@pytest.mark.parametrize("total", [200, 1000, 2049])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_exact_length_and_needle_depth(tokenizer, total, depth):
    check_prompt(tokenizer, total, depth, "40719")


def test_chat_template_wraps_the_prompt(tokenizer):
    text = tokenizer.decode(passkey_ids(tokenizer, 300, 0.5, "12345")).replace(" ", "")   # BERT spaces pieces
    if tokenizer.chat_template:
        assert text.startswith("<|user|>") and text.endswith("<|end|><|assistant|>")
    else:
        assert text.endswith("thepasskeyis")   # passkey_prompt's fallback (the tokenizer lowercases)


def test_haystack_start_picks_other_text_and_wraps_around(tokenizer):
    corpus = len(haystack._essay_ids(tokenizer))
    a = passkey_ids(tokenizer, 500, 0.5, "11111", haystack_start=0)
    b = passkey_ids(tokenizer, 500, 0.5, "11111", haystack_start=10_000)
    assert a != b
    check_prompt(tokenizer, 500, 0.5, "22222", start=corpus - 100)   # runs past the end of the corpus


def test_too_short_and_bad_depth_are_refused(tokenizer):
    with pytest.raises(ValueError, match="no room for a haystack"):
        passkey_ids(tokenizer, 20, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        passkey_ids(tokenizer, 500, 1.5, "12345")


@pytest.mark.slow
def test_smollm2_chat_prompts_are_exact():
    tok = tf.AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"), local_files_only=True)
    for total in (1024, 4096):
        ids = check_prompt(tok, total, 0.3, "58213")
        assert tok.decode(ids).startswith("<|im_start|>system")

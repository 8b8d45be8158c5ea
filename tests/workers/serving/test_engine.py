"""workers.serving.engine without Ray: greedy decoding against transformers' generate, batching, stop strings,
streaming pieces, ART statistics, KV policies, request limits and ART settings."""
from __future__ import annotations

import math

import pytest
import torch

from attention import ARTConfig
from workers.serving.engine import Engine, EngineConfig, Job
from workers.serving.requests import OFF, RequestError, art_config, kv_config
from workers.serving.sampling import SamplingParams

TINY = dict(model="random:llama-tiny", tokenizer="smollm2-135m", dtype="float32", device="cpu",
            model_overrides={"vocab_size": 49152, "max_position_embeddings": 512}, max_context=512,
            max_new_tokens=32)
LAYERS, KV_HEADS = 2, 2   # workers.data.assets.tiny_config for llama


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(**TINY))


def prompt(engine: Engine, n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, 40000, (n,), generator=gen).tolist()


def generate(engine: Engine, ids: list[int], n: int) -> list[int]:
    out = engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=n, pad_token_id=engine.codec.pad_id)
    return out[0, len(ids):].tolist()


def candidates(prompt_len: int, steps: int, block: int, batch: int = 1) -> int:
    """Candidate KV blocks of `steps` decode steps after a prompt (every layer and KV head)."""
    return LAYERS * KV_HEADS * batch * sum(math.ceil((prompt_len + i) / block) for i in range(1, steps + 1))


def test_greedy_with_art_off_equals_generate(engine):
    for n, seed in ((5, 0), (23, 1), (60, 2)):
        ids = prompt(engine, n, seed)
        [done] = engine.run([Job(ids, 12)])
        assert done.tokens == generate(engine, ids, 12)
        assert done.finish_reason == "length" and done.completion_tokens == 12 and done.prompt_tokens == n
        assert done.text == engine.codec.decode(done.tokens)
    # the ART session restored the model: generate ran on stock attention above, and still does
    assert engine.model.config._attn_implementation != "sparta_art"


def test_batch_of_ragged_prompts_equals_single_runs(engine):
    jobs = [Job(prompt(engine, n, seed=n), 10) for n in (7, 19, 33)]
    singles = [engine.run([Job(j.prompt, 10)])[0].tokens for j in jobs]
    batched = engine.run(jobs)
    assert [d.tokens for d in batched] == singles
    assert {d.art.batch_size for d in batched} == {3}
    # candidates of a left-padded batch count each sequence's own blocks (padding excluded)
    assert batched[0].art.candidate_blocks == sum(candidates(len(j.prompt), 9, 64) for j in jobs)


def test_different_art_settings_decode_in_separate_groups(engine):
    ids = prompt(engine, 40)
    jobs = [Job(ids, 6), Job(ids, 6, art=art_config("tuned+block_size=16")), Job(ids, 6)]
    assert engine.groups(jobs) == [[0, 2], [1]]
    done = engine.run(jobs)
    assert [d.art.batch_size for d in done] == [2, 1, 2]
    assert done[1].art.mode == "stability" and done[0].art.mode == "off"
    assert done[1].art.candidate_blocks == candidates(40, 5, 16)


def test_stop_strings_cut_the_text_and_the_stream(engine):
    ids = prompt(engine, 12, seed=3)
    [full] = engine.run([Job(ids, 16)])
    mid = len(full.text) // 2
    stop = full.text[mid: mid + 4]
    assert stop.strip() and full.text.find(stop) > 0
    pieces: list[str] = []
    [done] = engine.run([Job(ids, 16, stop=(stop, "never-seen"), on_text=pieces.append)])
    assert done.text == full.text[: full.text.find(stop)]
    assert done.finish_reason == "stop" and done.completion_tokens < 16
    assert "".join(pieces) == done.text and len(pieces) > 1 and not any(stop in p for p in pieces)
    # without a stop string the pieces add up to the whole completion, one or more per token
    pieces.clear()
    [again] = engine.run([Job(ids, 16, on_text=pieces.append)])
    assert "".join(pieces) == full.text == again.text


def test_eos_ends_a_completion(engine):
    ids = prompt(engine, 9, seed=4)
    [free] = engine.run([Job(ids, 8)])
    eos_at = free.tokens[3]   # pretend the fourth generated token is the end of a turn
    engine.codec.eos_ids = frozenset({*engine.codec.eos_ids, eos_at})
    try:
        [done] = engine.run([Job(ids, 8)])
    finally:
        engine.codec.eos_ids = frozenset(engine.codec.eos_ids - {eos_at})
    assert done.tokens == free.tokens[:4] and done.finish_reason == "stop"
    assert done.text == engine.codec.decode(free.tokens[:3])


def test_art_statistics_count_blocks_and_skips(engine):
    ids = prompt(engine, 300, seed=5)
    # everything "stable": stop after min_blocks + patience blocks, so ART must skip most of the cache
    eager = art_config({"preset": "aggressive", "tau": 1.0, "phi": 1.0, "patience": 1, "min_blocks": 1,
                        "block_size": 8, "recent_blocks": 0, "sink_tokens": 0})
    exact = art_config({"preset": "tuned", "block_size": 8})
    [skip] = engine.run([Job(ids, 5, art=eager)])
    [full] = engine.run([Job(ids, 5, art=OFF)])
    assert skip.art.candidate_blocks == candidates(300, 4, 8)
    assert full.art.visited_blocks == full.art.candidate_blocks == candidates(300, 4, OFF.block_size)
    assert skip.art.visited_blocks <= LAYERS * KV_HEADS * 4 * 3   # a few blocks per head and step
    assert 0.9 < skip.art.skipped_fraction < 1.0 and skip.art.decode_steps == 4
    [tuned] = engine.run([Job(ids, 5, art=exact)])
    assert 0 < tuned.art.visited_blocks <= tuned.art.candidate_blocks == candidates(300, 4, 8)


def test_kv_policy_groups_equal_lengths_and_shrinks_the_cache(engine):
    snap = Engine(EngineConfig(**{**TINY, "policy": "snapkv", "policy_ratio": 0.5}))
    jobs = [Job(prompt(snap, 100, seed=s), 4) for s in (6, 7)] + [Job(prompt(snap, 80, seed=8), 4)]
    assert snap.groups(jobs) == [[0, 1], [2]]   # a press needs unpadded prompts of one length
    done = snap.run(jobs)
    assert [d.art.batch_size for d in done] == [2, 2, 1]
    dense = engine.run([Job(jobs[0].prompt, 4), Job(jobs[1].prompt, 4)])
    assert done[0].art.candidate_blocks < dense[0].art.candidate_blocks   # half the prompt's KV is gone
    assert all(d.completion_tokens == 4 for d in done)
    # SnapKV observes the last 64 prompt positions: a shorter prompt is served without the press
    ids = prompt(snap, 30, seed=9)
    [short] = snap.run([Job(ids, 6)])
    assert short.tokens == engine.run([Job(ids, 6)])[0].tokens


def test_completion_says_which_kv_policy_was_applied(engine):
    long, short = prompt(engine, 100, seed=21), prompt(engine, 30, seed=22)
    done = engine.run([Job(long, 3, kv=("snapkv", 0.5)), Job(long, 3), Job(long, 3, kv=("quest", 0.25)),
                       Job(short, 3, kv=("snapkv", 0.5))])
    assert done[0].kv == {"policy": "snapkv", "ratio": 0.5}
    assert done[1].kv == {"policy": "dense", "ratio": 0.0}
    assert done[2].kv == {"policy": "quest", "ratio": 0.25}
    # SnapKV scores from the last 64 prompt positions: a 30-token prompt is served dense, and says so
    kv = done[3].kv
    assert {k: kv[k] for k in ("policy", "ratio", "requested")} == {
        "policy": "dense", "ratio": 0.0, "requested": {"policy": "snapkv", "ratio": 0.5}}
    assert "30" in kv["reason"] and "64" in kv["reason"], kv["reason"]
    assert done[3].tokens == engine.run([Job(short, 3)])[0].tokens


def test_limits(engine):
    assert engine.max_tokens_for(10, None) == 32                 # max_new_tokens caps the default
    assert engine.max_tokens_for(500, None) == 12                # ... and so does the context left
    assert engine.max_tokens_for(10, 32) == 32
    for bad in (0, 33, -1):
        with pytest.raises(RequestError, match="max_tokens must be between 1 and 32") as e:
            engine.max_tokens_for(10, bad)
        assert e.value.param == "max_tokens"
    with pytest.raises(RequestError, match="needs 514 tokens .prompt 490 \\+ max_tokens 24.* limit is 512") as e:
        engine.max_tokens_for(490, 24)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(RequestError, match="prompt has 512 tokens") as e:
        engine.max_tokens_for(512, None, "messages")
    assert e.value.param == "messages"
    with pytest.raises(RequestError, match="token id 49152 is outside the vocabulary"):
        engine.check_prompt_ids([1, 49152])
    with pytest.raises(RequestError, match="empty"):
        engine.check_prompt_ids([])


def test_art_config_values_and_errors():
    assert art_config(None) == OFF and art_config("off") == OFF
    assert art_config("tuned+tau=3e-3+block_size=32") == ARTConfig.preset("tuned", tau=3e-3, block_size=32)
    base = ARTConfig.preset("paper")
    assert art_config({"tau": 1e-4}, base) == base.with_overrides(tau=1e-4)          # a dict overrides the base
    assert art_config({"preset": "certified", "eps": 1e-4}, base) == ARTConfig.preset("certified", eps=1e-4)
    assert art_config({"preset": "off"}, base) == OFF
    cases = [({"tauu": 1}, "art.tauu", "unknown ART field 'tauu'; valid: preset, mode, block_size"),
             ({"tau": "big"}, "art.tau", "'tau' must be a number"),
             ({"block_size": 32.0}, "art.block_size", "'block_size' must be an integer"),
             ({"block_size": 4}, "art.block_size", r"must be in \[8, 1024\]"),
             ({"preset": "fast"}, "art.preset", "unknown ART preset 'fast'; valid: paper, certified, tuned"),
             ({"mode": "magic"}, "art", "unknown mode 'magic'; valid: stability, certified, skip, walk, off"),
             ("tuned+foo=1", "art", "unknown ART field 'foo'"),
             ("fastest", "art", "unknown ART preset 'fastest'"),
             (7, "art", "a preset name"),
             # JSON's false/true stay errors (a string says what is meant); the spec maps YAML's bare off
             (False, "art", 'got false; to turn ART off send "off"'),
             (True, "art", "preset name .paper, certified, tuned, aggressive, skip, walk;.*got true$")]
    for value, param, message in cases:
        with pytest.raises(RequestError, match=message) as e:
            art_config(value)
        assert e.value.param == param, value


def test_chat_template_and_byte_fallback(engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = engine.codec.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "Be brief." in text
    assert engine.codec.chat(messages) == engine.codec.tok(text, add_special_tokens=False)["input_ids"]
    plain = Engine(EngineConfig(model="random:llama-tiny", max_context=128, max_new_tokens=8))
    assert type(plain.codec.tok).__name__ == "ByteTokenizer" and not plain.codec.has_template
    ids = plain.codec.chat(messages)
    assert plain.codec.decode(ids) == "system: Be brief.\nuser: Hi there\nassistant:"
    [done] = plain.run([Job(ids, 5)])
    assert done.completion_tokens <= 5 and done.prompt_tokens == len(ids)


def test_config_errors():
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        Engine(EngineConfig(**{**TINY, "max_context": 1024}))
    with pytest.raises(ValueError, match="unknown KV policy 'snap'"):
        Engine(EngineConfig(**{**TINY, "policy": "snap"}))
    with pytest.raises(ValueError, match="the tokenizer has 49152 tokens but the model's vocabulary only 256"):
        Engine(EngineConfig(model="random:llama-tiny", tokenizer="smollm2-135m", max_context=128))


def test_per_job_kv_policy_decodes_like_an_engine_configured_with_it(engine):
    snap = Engine(EngineConfig(**{**TINY, "policy": "snapkv", "policy_ratio": 0.5}))
    ids = [prompt(engine, 100, seed=s) for s in (11, 12)]
    jobs = [Job(ids[0], 4, kv=("snapkv", 0.5)), Job(ids[0], 4), Job(ids[1], 4, kv=("snapkv", 0.5))]
    assert engine.groups(jobs) == [[0, 2], [1]]   # one policy per group (equal lengths, so together)
    done = engine.run(jobs)
    want = snap.run([Job(ids[0], 4), Job(ids[1], 4)])
    assert [done[0].tokens, done[2].tokens] == [w.tokens for w in want]
    assert done[0].art.candidate_blocks == want[0].art.candidate_blocks   # counts are per batch (of 2 here)
    assert done[0].art.candidate_blocks / 2 < done[1].art.candidate_blocks   # half the prompt's KV is gone
    # and the other way round: a dense job on the snapkv engine is the dense engine's answer
    [dense] = snap.run([Job(ids[0], 4, kv=("dense", 0.0))])
    assert dense.tokens == done[1].tokens and dense.art.candidate_blocks == done[1].art.candidate_blocks


def test_kv_config_values_and_errors():
    base = ("dense", 0.0)
    assert kv_config(None, base) == base and kv_config({"policy": "snapkv", "ratio": 0.5}, base) == ("snapkv", 0.5)
    assert kv_config({"ratio": 0.25}, ("streaming", 0.5)) == ("streaming", 0.25)
    assert kv_config({"policy": "h2o"}, base) == ("h2o", 0.0)
    cases = [({"policy": "snap"}, "kv.policy", "unknown KV policy 'snap'; valid: dense, streaming, snapkv"),
             ({"policy": "snapkv", "ratio": 1.0}, "kv.ratio", r"in \[0, 1\)"),
             ({"policy": "snapkv", "ratio": "half"}, "kv.ratio", "must be a number"),
             ({"policy": "snapkv", "keep": 1}, "kv.keep", "unknown KV field 'keep'; valid: policy, ratio"),
             ("snapkv", "kv", "as an object")]
    for value, param, message in cases:
        with pytest.raises(RequestError, match=message) as e:
            kv_config(value, base)
        assert e.value.param == param and e.value.status == 400, value


def test_a_model_art_cannot_drive_decodes_plainly_and_refuses_art_by_name():
    # GPT-2's attention has no hook for ART or the KV policies: greedy decoding still works, ART is refused.
    cfg = dict(TINY, model="random:gpt2-tiny", model_overrides={"vocab_size": 49152, "max_position_embeddings": 512})
    engine = Engine(EngineConfig(**cfg))
    assert not engine.art_supported
    ids = prompt(engine, 20)
    [done] = engine.run([Job(ids, 6)])
    assert done.tokens == generate(engine, ids, 6)[:len(done.tokens)] and done.art.visited_blocks == 0
    with pytest.raises(RequestError, match="ART is not available for GPT2LMHeadModel") as e:
        engine.run([Job(ids, 4, art=ARTConfig.preset("tuned"))])
    assert e.value.param == "art"
    with pytest.raises(RequestError, match="KV policy 'snapkv' is not available") as e:
        engine.run([Job(ids, 4, kv=("snapkv", 0.5))])
    assert e.value.param == "kv.policy"
    with pytest.raises(ValueError, match="ART is not available for GPT2LMHeadModel.*server's default art"):
        Engine(EngineConfig(**cfg, art=ARTConfig.preset("tuned").to_dict()))


def test_prefill_reuse_decodes_every_art_setting_from_one_prefill(engine):
    """An evaluation decoding one prompt batch under many ART settings prefills it once per KV policy; each
    setting decodes what it would after its own prefill, sampled choices included (the kept logits)."""
    keep = Engine(EngineConfig(**TINY, prefill_reuse=2))
    ids = [prompt(engine, 200, seed=s) for s in (31, 32)]
    eager = art_config({"preset": "aggressive", "tau": 1.0, "phi": 1.0, "patience": 1, "min_blocks": 1,
                        "block_size": 8, "recent_blocks": 0, "sink_tokens": 0})
    sampled = SamplingParams(temperature=1.0, seed=7)
    for art in (OFF, art_config({"preset": "tuned", "block_size": 16}), eager):
        jobs = lambda: [Job(ids[0], 6, art=art), Job(ids[1], 6, art=art, sampling=sampled)]  # noqa: E731
        fresh, reused = engine.run(jobs()), keep.run(jobs())
        assert [d.tokens for d in reused] == [d.tokens for d in fresh]
        assert [d.art.visited_blocks for d in reused] == [d.art.visited_blocks for d in fresh]
    assert keep.prefills == {"run": 1, "reused": 2}
    assert reused[0].prefill_s == 0.0 and fresh[0].prefill_s > 0
    [snap] = keep.run([Job(ids[0], 4, kv=("snapkv", 0.5))])   # another policy: its own prefill
    assert keep.prefills == {"run": 2, "reused": 2} and snap.prefill_s > 0
    keep.run([Job(ids[0], 4, kv=("quest", 0.25))])   # a third: the least recently used (dense) is dropped
    keep.run([Job(ids[0], 4, art=OFF), Job(ids[1], 4, art=OFF, sampling=sampled)])
    assert keep.prefills == {"run": 4, "reused": 2} and len(keep.kept_prefills) == 2
    assert engine.prefills["reused"] == 0   # off by default

"""workers.serving.continuous without Ray: the continuously batched engine against the static engine and
transformers' generate (tiny random models, fp32), with chunked prefill, more requests than KV slots,
per-row ART settings and KV policies, sampling, cancellation, admission and failures."""
from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from attention import ARTConfig
from workers.serving.continuous import ContinuousEngine, Overloaded
from workers.serving.engine import Engine, EngineConfig, Job
from workers.serving.requests import OFF, art_config
from workers.serving.sampling import SamplingParams

TINY = dict(model="random:llama-tiny", tokenizer="smollm2-135m", dtype="float32", device="cpu",
            model_overrides={"vocab_size": 49152, "max_position_embeddings": 512}, max_context=256,
            max_new_tokens=40, kv_cache_tokens=4 * 256, max_prefill_tokens=32)
LAYERS, KV_HEADS = 2, 2


@pytest.fixture(scope="module")
def static() -> Engine:
    return Engine(EngineConfig(**TINY))


@pytest.fixture(scope="module")
def engine():
    engine = ContinuousEngine(EngineConfig(**TINY))
    yield engine
    engine.close()


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(10, 40000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def idle(engine: ContinuousEngine) -> dict:
    """The engine's load once it has nothing left to do (slots all free)."""
    deadline = time.monotonic() + 30
    while (load := engine.load())["running_sequences"] or load["queued_requests"]:
        assert time.monotonic() < deadline, load
        time.sleep(0.01)
    return load


def test_greedy_equals_the_static_engine_with_chunked_prefill_and_more_jobs_than_slots(engine, static):
    jobs = [(prompt(n, seed=n), m) for n, m in ((5, 12), (23, 6), (90, 12), (150, 3), (7, 20), (64, 9), (33, 1))]
    want = [static.run([Job(p, m)])[0] for p, m in jobs]
    got = engine.run([Job(p, m) for p, m in jobs])   # 7 jobs, 4 slots: some wait; 150 tokens: 5 chunks of 32
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    assert all(g.finish_reason == "length" and g.prompt_tokens == len(p) for g, (p, _) in zip(got, jobs))
    load = idle(engine)
    assert load["kv_slots_used"] == 0 and load["kv_used_tokens"] == 0   # every slot given back, empty
    assert load["prefill_tokens"] >= sum(len(p) for p, _ in jobs)


def test_each_request_counts_its_own_art_work(engine):
    ids = [prompt(100, seed=s) for s in (1, 2)]
    # (nearly) every block "stable": a row stops a few blocks into each head's walk
    eager = art_config({"preset": "aggressive", "tau": 1.0, "phi": 1.0, "patience": 1, "min_blocks": 1,
                        "block_size": 16, "recent_blocks": 0, "sink_tokens": 0})
    done = engine.run([Job(ids[0], 5, art=eager), Job(ids[1], 7, art=OFF), Job(ids[0], 5, art=eager)])
    steps = lambda n: range(1, n)   # noqa: E731  (decode steps after the prefill's token)
    cand_eager = LAYERS * KV_HEADS * sum(math.ceil((100 + i) / 16) for i in steps(5))
    cand_off = LAYERS * KV_HEADS * sum(math.ceil((100 + i) / 64) for i in steps(7))
    assert [d.art.candidate_blocks for d in done] == [cand_eager, cand_off, cand_eager]
    assert done[1].art.visited_blocks == cand_off and done[1].art.mode == "off"
    for d in (done[0], done[2]):   # a few blocks per layer, head and step, of 7 candidates each
        assert 0 < d.art.visited_blocks <= LAYERS * KV_HEADS * 4 * 3 < cand_eager / 2
    assert [d.art.decode_steps for d in done] == [4, 6, 4]
    assert max(d.art.batch_size for d in done) >= 2 and done[0].tokens == done[2].tokens


def test_rows_with_different_art_settings_decode_in_one_batch_as_they_do_alone(engine, static):
    ids = [prompt(70, seed=10 + i) for i in range(4)]
    arts = [OFF, art_config("tuned+block_size=16"), art_config("certified+block_size=16+eps=1e-4"),
            art_config("paper+block_size=32")]
    want = [static.run([Job(p, 10, art=a)])[0].tokens for p, a in zip(ids, arts)]
    got = engine.run([Job(p, 10, art=a) for p, a in zip(ids, arts)])
    assert [g.tokens for g in got] == want
    assert [g.art.mode for g in got] == ["off", "stability", "certified", "stability"]
    assert all(g.art.batch_size == 4 for g in got)


def test_rows_reading_balls_get_them_from_the_pool_and_decode_as_they_do_alone(engine, static):
    """Box+ball bounds and the value-aware certificate read the balls the pool keeps for their block size
    (while such a row runs), and decode what the static engine (balls kept by its cache) decodes."""
    ids = [prompt(90, seed=30 + i) for i in range(3)]
    arts = [art_config({"preset": "certified", "block_size": 16, "eps": 1e-2, "certificate": "relative",
                        "score_bound": "box+ball"}),
            art_config({"preset": "aggressive", "tau": 1.0, "phi": 1.0, "patience": 1, "min_blocks": 1,   # stops
                        "recent_blocks": 0, "sink_tokens": 0, "block_size": 16, "order": "bound",
                        "score_bound": "box+ball"}),
            art_config({"preset": "certified", "block_size": 32, "eps": 1e-3})]   # key bounds only
    want = [static.run([Job(p, 12, art=a)])[0].tokens for p, a in zip(ids, arts)]
    seen: list[tuple[set, set]] = []
    on_delta = lambda d: seen.append((set(engine.pool.bounds), set(engine.pool.balls)))   # noqa: E731
    got = engine.run([Job(p, 12, art=a, on_delta=on_delta if i == 0 else None) for i, (p, a) in enumerate(zip(ids, arts))])
    assert [g.tokens for g in got] == want
    assert [g.art.mode for g in got] == ["certified", "stability", "certified"]
    assert ({16, 32}, {16}) in seen   # balls for block size 16 only, whose rows read them
    assert got[1].art.visited_blocks < got[1].art.candidate_blocks   # the ball-ranked walk stopped early


@pytest.fixture(scope="module")
def slow():
    """An engine whose steps take at least 20 ms: requests stay in flight long enough to overlap."""
    engine = ContinuousEngine(EngineConfig(**{**TINY, "_step_delay_s": 0.02}))
    yield engine
    engine.close()


def test_a_short_request_finishes_while_a_long_one_decodes(slow):
    engine = slow
    events: list[tuple[str, int]] = []
    lock = threading.Lock()

    def log(name):
        def on_delta(delta):
            with lock:
                events.append((name, len(delta.tokens)))
        return on_delta

    long = engine.submit(Job(prompt(40, 3), 40, on_delta=log("long")))
    while not any(name == "long" for name, _ in events):
        time.sleep(0.001)
    short = engine.submit(Job(prompt(8, 4), 3, on_delta=log("short")))
    short_done = short.result(timeout=60)
    assert not long.done()
    assert short_done.completion_tokens == 3 and long.result(timeout=60).completion_tokens == 40
    names = [name for name, _ in events]
    last_short = max(i for i, n in enumerate(names) if n == "short")
    assert names.index("long") < names.index("short")
    assert names[last_short + 1:].count("long") >= 30   # the long one kept producing after the short one ended


def test_running_rows_keep_decoding_while_a_long_prompt_is_prefilled_in_chunks(engine, static):
    order: list[str] = []
    running = engine.submit(Job(prompt(10, 5), 30, on_delta=lambda d: order.append("decode")))
    while not order:
        time.sleep(0.001)
    long_ids = prompt(200, 6)
    long = engine.submit(Job(long_ids, 4, on_delta=lambda d: order.append("long")))
    long.result(timeout=60)
    running.result(timeout=60)
    first_long = order.index("long")
    # 200 prompt tokens at 32 per step: 7 steps of prefill, each also decoding the running row
    assert order[:first_long].count("decode") >= 200 // 32
    assert long.result().tokens == static.run([Job(long_ids, 4)])[0].tokens
    assert long.result().ttft_s > 0 and running.result().tpot_s > 0


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(engine):
    ids = prompt(30, 7)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    [alone] = engine.run([Job(ids, 16, sampling=seeded)])
    busy = [Job(prompt(20 + i, 50 + i), 16, sampling=SamplingParams(temperature=0.7, seed=i)) for i in range(3)]
    crowd = engine.run(busy[:1] + [Job(ids, 16, sampling=seeded)] + busy[1:])
    assert crowd[1].tokens == alone.tokens
    # a random model's next-token distribution is nearly flat over 49k tokens: another seed differs
    [other] = engine.run([Job(ids, 16, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=4321))])
    assert other.tokens != alone.tokens


def test_n_choices_share_the_prompt_and_differ(engine):
    ids = prompt(50, 8)
    [done] = engine.run([Job(ids, 12, n=3, sampling=SamplingParams(seed=5))])
    assert [c.index for c in done.choices] == [0, 1, 2] and done.completion_tokens == 36
    assert len({tuple(c.tokens) for c in done.choices}) == 3
    # choice i of a seeded request is reproducible on its own
    [again] = engine.run([Job(ids, 12, n=3, sampling=SamplingParams(seed=5))])
    assert [c.tokens for c in again.choices] == [c.tokens for c in done.choices]
    # greedy choices are identical (and equal a single greedy run)
    [greedy] = engine.run([Job(ids, 6, n=2, sampling=SamplingParams(temperature=0))])
    [single] = engine.run([Job(ids, 6, sampling=SamplingParams(temperature=0))])
    assert greedy.choices[0].tokens == greedy.choices[1].tokens == single.tokens
    assert idle(engine)["kv_slots_used"] == 0


def test_logprobs_are_the_models_log_softmax_of_the_chosen_tokens(engine, static):
    ids = prompt(25, 9)
    [done] = engine.run([Job(ids, 8, sampling=SamplingParams(temperature=0.8, seed=3, logprobs=3))])
    lps = done.choices[0].logprobs
    assert [lp.token for lp in lps] == done.tokens
    with torch.no_grad():   # the same random model (seeded init), stock attention, one forward
        logits = static.model(torch.tensor([ids + done.tokens])).logits[0]
    want = torch.log_softmax(logits[len(ids) - 1: -1].float(), -1)
    got = torch.tensor([lp.logprob for lp in lps])
    torch.testing.assert_close(got, want[torch.arange(8), torch.tensor(done.tokens)], rtol=1e-4, atol=1e-4)
    for i, lp in enumerate(lps):
        top = want[i].topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()


def test_kv_policies_per_row(engine, static):
    long = [prompt(200, seed=s) for s in (11, 12)]
    jobs = [Job(long[0], 4, kv=("snapkv", 0.5)), Job(long[1], 4), Job(long[1], 4, kv=("quest", 0.5)),
            Job(prompt(30, 13), 4, kv=("snapkv", 0.5)), Job(long[0], 4, kv=("pyramidkv", 0.5))]
    want = [static.run([Job(j.prompt, 4, kv=j.kv)])[0] for j in jobs]
    got = engine.run(jobs)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert [g.kv for g in got] == [w.kv for w in want]
    assert got[3].kv["policy"] == "dense" and "30" in got[3].kv["reason"]
    # half of the prompt's KV is gone: fewer candidate blocks than the dense row's
    assert got[0].art.candidate_blocks < got[1].art.candidate_blocks
    # quest keeps 2 of the 4 blocks of 64 per step (the sink and the newest are always kept)
    assert got[2].art.candidate_blocks == got[1].art.candidate_blocks // 2


def test_a_full_engine_refuses_with_retry_after_and_loses_nothing():
    slow = ContinuousEngine(EngineConfig(**{**TINY, "kv_cache_tokens": 2 * 256, "max_queued": 1,
                                            "_step_delay_s": 0.02}))
    try:
        admitted = [slow.submit(Job(prompt(10, i), 20)) for i in range(3)]   # 2 slots + 1 waiting
        with pytest.raises(Overloaded) as e:
            slow.submit(Job(prompt(10, 9), 20))
        assert e.value.status == 503 and e.value.retry_after_s >= 1 and "retry" in e.value.message
        done = [f.result(timeout=60) for f in admitted]
        assert [d.completion_tokens for d in done] == [20, 20, 20]
        assert slow.submit(Job(prompt(10, 9), 2)).result(timeout=60).completion_tokens == 2
    finally:
        slow.close()


def test_a_cancelled_job_leaves_at_the_next_step_and_frees_its_slot(slow):
    got = []
    job = Job(prompt(10, 1), 40, on_delta=got.append)
    future = slow.submit(job)
    while len(got) < 3:
        time.sleep(0.005)
    assert slow.load()["kv_slots_used"] == 1
    job.cancelled = True
    done = future.result(timeout=30)
    assert done.finish_reason == "cancelled" and 3 <= done.completion_tokens < 40
    assert got[-1].finish_reason == "cancelled"
    assert idle(slow)["kv_slots_used"] == 0


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving():
    bad = prompt(6, 77)
    engine = ContinuousEngine(EngineConfig(**{**TINY, "_fail_prompt": tuple(bad)}))
    try:
        with pytest.raises(RuntimeError, match="injected engine fault"):
            engine.submit(Job(bad, 4)).result(timeout=30)
        assert engine.load()["failed_steps"] == 1
        ok = engine.submit(Job(prompt(6, 78), 4)).result(timeout=30)
        assert ok.completion_tokens == 4 and idle(engine)["kv_slots_used"] == 0
    finally:
        engine.close()


@pytest.mark.parametrize("arch,overrides", [
    ("gemma3", {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}),
    ("gpt2", {}),
])
def test_other_architectures_match_generate(arch, overrides):
    cfg = {**TINY, "model": f"random:{arch}-tiny", "model_overrides": {**TINY["model_overrides"], **overrides}}
    engine, ref = ContinuousEngine(EngineConfig(**cfg)), Engine(EngineConfig(**cfg))   # the same seeded weights
    try:
        jobs = [(prompt(n, seed=n), 8) for n in (9, 45, 70)]
        got = engine.run([Job(p, m) for p, m in jobs])
        for (ids, m), done in zip(jobs, got):
            want = ref.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      do_sample=False, max_new_tokens=m, pad_token_id=ref.codec.pad_id)
            assert done.tokens == want[0, len(ids):].tolist()[: len(done.tokens)]
    finally:
        engine.close()


def test_bad_configs_and_requests():
    with pytest.raises(ValueError, match="holds no slot"):
        ContinuousEngine(EngineConfig(**{**TINY, "kv_cache_tokens": 100}))


def test_n_beyond_the_slots_is_refused(engine):
    from workers.serving.requests import RequestError

    with pytest.raises(RequestError, match="n .5. exceeds the 4 sequences") as e:
        engine.submit(Job(prompt(5), 3, n=5))
    assert e.value.param == "n"


def test_art_config_is_a_frozen_key():
    # rows are grouped per step by their ART settings: equal settings must be one group key
    assert art_config("tuned+block_size=16") == ARTConfig.preset("tuned", block_size=16)
    assert len({art_config("tuned"), art_config("tuned"), OFF}) == 2

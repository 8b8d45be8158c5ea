"""The Serve replica over real HTTP: a tiny random Llama (SmolLM2's tokenizer and chat template) deployed
with 2 replicas (continuous scheduler, greedy by default) on a local Ray and Serve bound to 127.0.0.1, and a
one-replica app with 2 KV slots whose steps take 50 ms (to hold its pool full). Expected tokens come from
the same model loaded here and transformers' `generate`."""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from attention import ARTConfig
from workers.serving.engine import Engine, EngineConfig, Job
from tests.helpers import free_port

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONFIG = dict(model="random:llama-tiny", name="tiny", tokenizer="smollm2-135m", dtype="float32", device="cpu",
              model_overrides={"vocab_size": 49152, "max_position_embeddings": 512}, max_context=256,
              max_new_tokens=24, art=ARTConfig.preset("tuned", block_size=16).to_dict(), threads=1,
              sampling={"temperature": 0.0},   # this deployment decodes greedily unless a request says otherwise
              _fail_prompt=(5, 6, 7, 8, 9))   # test-only: a step holding exactly this prompt raises in the engine
# One replica, 2 KV slots, 1 waiting request at most, 50 ms per step: long requests hold it full.
SMALL = dict(CONFIG, name="small", kv_cache_tokens=2 * 256, max_queued=1, max_new_tokens=24, _step_delay_s=0.05,
             _fail_prompt=None)
LAYERS, KV_HEADS = 2, 2
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       **{k: os.environ[k] for k in ("SPARTA_CACHE", "TORCH_EXTENSIONS_DIR") if os.environ.get(k)}}




@pytest.fixture(scope="module")
def url():
    os.environ.update({k: v for k, v in ENV.items() if k.startswith("RAY_")})
    import ray
    from ray import serve

    from workers.serving.replica import Replica

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": ENV}, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = Replica.options(num_replicas=2, max_ongoing_requests=16, health_check_timeout_s=120,
                          ray_actor_options={"num_cpus": 0.5}).bind(CONFIG, KEY, 4, 0.05)
    serve.run(app, name="tiny-test", route_prefix="/")
    small = Replica.options(name="SmallReplica", num_replicas=1, max_ongoing_requests=32, health_check_timeout_s=120,
                            ray_actor_options={"num_cpus": 0.5}).bind(SMALL, KEY)
    serve.run(small, name="small-test", route_prefix="/small")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


@pytest.fixture(scope="module")
def ref() -> Engine:
    """The same model in this process: its codec, and `generate` as the reference decoder."""
    return Engine(EngineConfig(**CONFIG))


def generate(ref: Engine, ids: list[int], n: int) -> list[int]:
    out = ref.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, pad_token_id=ref.codec.pad_id)
    return out[0, len(ids):].tolist()


def token_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(10, 40000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def post(url: str, path: str, body, headers=AUTH, timeout: float = 120, **kw) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json", **headers},
                      timeout=timeout, **kw)


def events(url: str, path: str, body: dict) -> list:
    """The server-sent events of a streamed response: parsed JSON objects, then the literal "[DONE]"."""
    out = []
    with httpx.stream("POST", url + path, json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: ")
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_models_and_api_key(url):
    health = httpx.get(url + "/healthz", timeout=30).json()   # no key needed: a probe
    assert health["status"] == "ok" and health["model"] == "tiny"
    models = httpx.get(url + "/v1/models", headers=AUTH, timeout=30)
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["tiny"]
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for r in (httpx.get(url + "/v1/models", headers=headers, timeout=30),
                  post(url, "/v1/completions", body, headers=headers),
                  post(url, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
                       headers=headers)):
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key" and "API key" in r.json()["error"]["message"]
    assert post(url, "/v1/completions", body).status_code == 200


def test_greedy_with_art_off_equals_generate(url, ref):
    ids = token_prompt(20, seed=1)
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 12, "art": "off",
                                      "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    [choice] = body["choices"]
    assert choice["token_ids"] == generate(ref, ids, 12)
    assert choice["text"] == ref.codec.decode(choice["token_ids"]) and choice["finish_reason"] == "length"
    usage = body["usage"]
    assert {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == \
        {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32}
    # this request's own decode-attention work and timing
    assert usage["art"]["candidate_blocks"] == body["art"]["candidate_blocks"] > 0 and usage["art"]["decode_steps"] == 11
    assert 0 < usage["ttft_s"] <= usage["e2e_s"] and usage["tpot_s"] > 0
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    assert body["art"]["mode"] == "off" and r.headers["x-sparta-replica"] == body["replica"]
    # a text prompt is tokenised as the model's tokenizer does
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 6,
                                      "art": "off", "return_token_ids": True}).json()
    text_ids = ref.codec.encode("The capital of France is")
    assert r["prompt_token_ids"] == text_ids and r["choices"][0]["token_ids"] == generate(ref, text_ids, 6)


def test_concurrent_requests_spread_over_replicas_and_batch(url, ref):
    prompts = [token_prompt(16, seed=100 + i) for i in range(12)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda ids: post(url, "/v1/completions", {
            "model": "tiny", "prompt": ids, "max_tokens": 8, "art": "off", "return_token_ids": True}), prompts))
    assert [r.status_code for r in replies] == [200] * len(prompts)
    bodies = [r.json() for r in replies]
    assert len({b["replica"] for b in bodies}) == 2   # both replicas answered
    assert max(b["art"]["batch_size"] for b in bodies) > 1   # requests decoded together
    for ids, b in zip(prompts, bodies):   # ... and batched decoding gives each request its own greedy tokens
        assert b["choices"][0]["token_ids"] == generate(ref, ids, 8)


def test_chat_completions_streamed_and_not(url, ref):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 10}
    whole = post(url, "/v1/chat/completions", body).json()
    [choice] = whole["choices"]
    assert whole["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    template_ids = ref.codec.chat(messages)   # the tokenizer's chat template, generation prompt included
    assert whole["usage"]["prompt_tokens"] == len(template_ids)
    assert choice["message"]["content"] == ref.codec.decode(generate(ref, template_ids, 10))
    got = events(url, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert got[-1] == "[DONE]"
    chunks, usage, done = got[:-2], got[-2], got[-3]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == choice["message"]["content"] and len(chunks) > 3   # token by token
    assert done["choices"][0]["finish_reason"] == "length" and done["choices"][0]["delta"] == {}
    assert done["art"]["candidate_blocks"] > 0 and done["replica"]
    assert usage["choices"] == []
    timing = ("ttft_s", "tpot_s", "e2e_s")   # the stream's own timing; the rest equals the whole response's
    assert {k: v for k, v in usage["usage"].items() if k not in timing} == \
        {k: v for k, v in whole["usage"].items() if k not in timing}
    assert all(usage["usage"][k] > 0 for k in timing)


def test_completions_streamed_with_a_stop_string(url):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 20}
    full = post(url, "/v1/completions", body).json()["choices"][0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[: full.find(stop)]
    plain = post(url, "/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]
    assert plain["text"] == cut and plain["finish_reason"] == "stop"
    got = events(url, "/v1/completions", {**body, "stop": stop, "stream": True})
    assert got[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in got[:-1])
    assert "".join(e["choices"][0]["text"] for e in got[:-1]) == cut
    assert got[-2]["choices"][0]["finish_reason"] == "stop" and "usage" not in got[-2]


def test_art_statistics_and_per_request_overrides(url):
    ids = token_prompt(100, seed=7)
    body = {"model": "tiny", "prompt": ids, "max_tokens": 5}
    # the deployment's default: tuned with 16-position blocks; 4 decode steps after the prefill's token
    art = post(url, "/v1/completions", body).json()["art"]
    expected = LAYERS * KV_HEADS * sum(math.ceil((100 + i) / 16) for i in range(1, 5))
    assert art["mode"] == "stability" and art["decode_steps"] == 4 and art["batch_size"] == 1
    assert art["candidate_blocks"] == expected and 0 < art["visited_blocks"] <= expected
    assert art["skipped_fraction"] == pytest.approx(1 - art["visited_blocks"] / expected, abs=1e-6)
    # a request that lets ART stop after two blocks (everything counts as stable) skips most of them
    eager = {"tau": 1.0, "phi": 1.0, "patience": 1, "min_blocks": 1, "recent_blocks": 0, "sink_tokens": 0}
    art = post(url, "/v1/completions", {**body, "art": eager}).json()["art"]
    assert art["candidate_blocks"] == expected and art["visited_blocks"] < expected / 2
    assert art["skipped_fraction"] > 0.5
    art = post(url, "/v1/completions", {**body, "art": "certified+eps=1e-4"}).json()["art"]
    assert art["mode"] == "certified" and art["candidate_blocks"] == LAYERS * KV_HEADS * sum(
        math.ceil((100 + i) / 64) for i in range(1, 5))


def test_per_request_kv_policy(url, ref):
    ids = token_prompt(200, seed=8)
    body = {"model": "tiny", "prompt": ids, "max_tokens": 4, "art": "off", "return_token_ids": True}
    dense = post(url, "/v1/completions", body).json()
    snap = post(url, "/v1/completions", {**body, "kv": {"policy": "snapkv", "ratio": 0.5}}).json()
    # SnapKV dropped half the prompt's KV: fewer candidate blocks; the answer is the engine's with that policy
    assert snap["art"]["candidate_blocks"] < dense["art"]["candidate_blocks"]
    [want] = ref.run([Job(ids, 4, kv=("snapkv", 0.5))])
    assert snap["choices"][0]["token_ids"] == want.tokens
    assert post(url, "/v1/completions", {**body, "kv": {"policy": "dense"}}).json()["choices"][0]["token_ids"] == \
        dense["choices"][0]["token_ids"]
    # each response says which KV policy ran; a prompt shorter than SnapKV's 64-position window runs dense
    assert dense["kv"] == {"policy": "dense", "ratio": 0.0} and snap["kv"] == {"policy": "snapkv", "ratio": 0.5}
    short = {**body, "prompt": ids[:30], "kv": {"policy": "snapkv", "ratio": 0.5}}
    kv = post(url, "/v1/completions", short).json()["kv"]
    assert (kv["policy"], kv["ratio"], kv["requested"]) == ("dense", 0.0, {"policy": "snapkv", "ratio": 0.5})
    assert "30 tokens" in kv["reason"]
    streamed = events(url, "/v1/completions", {**short, "stream": True})
    assert streamed[-1] == "[DONE]" and streamed[-2]["kv"] == kv   # the last chunk, next to art
    # clients learn the context limit (as vLLM reports it) to check prompt lengths before sending
    card = httpx.get(url + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]
    assert card["max_model_len"] == CONFIG["max_context"]


BAD = [  # body, status, param, what the message must say
    ('{"model": "tiny", "prompt": ', 400, None, "not valid JSON"),
    ('["tiny"]', 400, None, "must be a JSON object"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ({"model": "tiny", "prompt": 12}, 400, "prompt", "prompt must be one string or one list of token ids"),
    ({"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"model": "tiny", "prompt": token_prompt(250, 0), "max_tokens": 10}, 400, "max_tokens",
     "needs 260 tokens .prompt 250 \\+ max_tokens 10. but the context limit is 256"),
    ({"model": "tiny", "prompt": token_prompt(256, 0)}, 400, "prompt", "leaves no room"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "between 1 and 24"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 25}, 400, "max_tokens", "between 1 and 24"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "unknown model 'gpt-4'; this server serves: tiny"),
    ({"model": "tiny", "prompt": "x", "art": {"tauu": 1e-3}}, 400, "art.tauu", "unknown ART field 'tauu'; valid: preset"),
    ({"model": "tiny", "prompt": "x", "art": {"block_size": 4}}, 400, "art.block_size", "must be in \\[8, 1024\\]"),
    ({"model": "tiny", "prompt": "x", "art": "turbo"}, 400, "art", "unknown ART preset 'turbo'"),
    ({"model": "tiny", "prompt": "x", "kv": {"policy": "snap"}}, 400, "kv.policy", "unknown KV policy 'snap'; valid: dense"),
    ({"model": "tiny", "prompt": "x", "kv": {"policy": "snapkv", "ratio": 1.5}}, 400, "kv.ratio", "in \\[0, 1\\)"),
    ({"model": "tiny", "prompt": "x", "temperature": 2.5}, 400, "temperature", "temperature must be a number in \\[0, 2\\]"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", "top_p must be a number in \\(0, 1\\]"),
    ({"model": "tiny", "prompt": "x", "top_k": -1}, 400, "top_k", "top_k must be an integer >= 0"),
    ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"model": "tiny", "prompt": "x", "n": 9}, 400, "n", "n .9. exceeds the 8 sequences"),
    ({"model": "tiny", "prompt": "x", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ({"model": "tiny", "prompt": "x", "best_of": 2}, 400, "best_of", "'best_of' is not supported by this server"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias", "'logit_bias' is not supported"),
    ({"model": "tiny", "prompt": "x", "frobnicate": 2}, 400, "frobnicate", "unknown parameter 'frobnicate'; valid: model"),
    ({"model": "tiny", "prompt": [5, 99999]}, 400, "prompt", "token id 99999 is outside the vocabulary"),
    ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4 stop strings"),
    ({"prompt": "x"}, 400, "model", "required"),
]
BAD_CHAT = [
    ({"model": "tiny", "messages": []}, 400, "messages", "at least 1 item"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role",
     "'system', 'user' or 'assistant'"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x", "mood": 1}]}, 400, "messages[0].mood",
     "unknown parameter 'messages\\[0\\].mood'; valid: role, content, name"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x " * 300}]}, 400, "messages", "leaves no room"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 99}, 400,
     "max_tokens", "between 1 and 24"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs",
     "top_logprobs needs logprobs: true"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": []}, 400, "tools",
     "'tools' is not supported"),
]


def test_bad_requests_get_4xx_and_the_service_keeps_serving(url):
    import re

    for path, cases in (("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)):
        for body, status, param, message in cases:
            r = post(url, path, body)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["param"] == param and re.search(message, err["message"]), (body, err)
            assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    r = httpx.get(url + "/v1/nothing", headers=AUTH, timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    for path, body in (("/v1/completions", {"model": "tiny", "prompt": "still here", "max_tokens": 3}),
                       ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 3})):
        replies = [post(url, path, body) for _ in range(4)]   # both replicas, most likely
        assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3 for r in replies)


def replica_health(url: str, replicas: int = 2) -> dict[str, dict]:
    """/healthz (with the request counters) of every replica, by replica id."""
    out, deadline = {}, time.monotonic() + 60
    while len(out) < replicas:
        health = httpx.get(url + "/healthz", timeout=30).json()
        out[health["replica"]] = health
        assert time.monotonic() < deadline, out
    return out


def test_a_failed_batch_is_a_counted_500_without_its_details(url, ref):
    import re

    fail = {"model": "tiny", "prompt": list(CONFIG["_fail_prompt"]), "max_tokens": 3}
    before = replica_health(url)
    r = post(url, "/v1/completions", fail)
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("server_error", "internal_error"), err
    match = re.fullmatch(r"internal error; request id (req-[0-9a-f]{24})", err["message"])
    assert match, err["message"]
    assert "injected" not in r.text and "RuntimeError" not in r.text and "_fail_prompt" not in r.text
    replica, rid = r.headers["x-sparta-replica"], match.group(1)
    after = replica_health(url)
    assert after[replica]["requests"] == before[replica]["requests"] + 1
    assert after[replica]["errors"] == before[replica]["errors"] + 1
    # the full traceback is in that replica's log, under the request id the client was given
    def logged() -> bool:
        logs = Path(os.environ.get("RAY_TMPDIR", "/tmp"), "ray").glob(f"session_*/logs/serve/replica_*_{replica}.log")
        return any(rid in (text := f.read_text()) and "Traceback" in text and "injected engine fault" in text
                   for f in logs)

    deadline = time.monotonic() + 30
    while not logged():
        assert time.monotonic() < deadline, f"no traceback logged for {rid}"
        time.sleep(0.5)
    # streamed: the status line is already sent, so the error comes in-band, as generic and as counted
    got = events(url, "/v1/completions", {**fail, "stream": True})
    assert got[-1] == "[DONE]" and set(got[-2]) == {"error"}, got
    assert re.fullmatch(r"internal error; request id req-[0-9a-f]{24}", got[-2]["error"]["message"]), got[-2]
    assert "injected" not in json.dumps(got)
    streamed = replica_health(url)
    assert sum(h["errors"] for h in streamed.values()) == sum(h["errors"] for h in after.values()) + 1
    # and both replicas keep serving, with the model's attention restored after the failure
    ids = token_prompt(12, seed=31)
    replies = [post(url, "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 4, "art": "off",
                                             "return_token_ids": True}) for _ in range(4)]
    assert [r.status_code for r in replies] == [200] * 4
    assert all(r.json()["choices"][0]["token_ids"] == generate(ref, ids, 4) for r in replies)


@pytest.mark.slow
def test_a_killed_replica_is_replaced(url):
    from ray import serve

    import threading

    body = {"model": "tiny", "prompt": "after the crash", "max_tokens": 4}
    stop, during = threading.Event(), []

    def load():   # clients keep sending while the replica dies; a request in flight on it may fail
        while not stop.is_set():
            try:
                during.append(post(url, "/v1/completions", body).status_code)
            except httpx.HTTPError:
                during.append(None)

    clients = [threading.Thread(target=load) for _ in range(3)]
    for c in clients:
        c.start()
    try:
        time.sleep(1)
        victim = httpx.get(url + "/healthz", timeout=30).json()
        os.kill(victim["pid"], signal.SIGKILL)   # a replica process this test's Ray started, under load
        time.sleep(2)
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=120)
    assert during.count(200) >= 3   # the load was real: requests were answered around the kill
    deadline = time.monotonic() + 120
    while True:   # Serve notices, restarts the replica and routes around the dead one meanwhile
        st = serve.status().applications["tiny-test"].deployments["SpartaReplica"]
        running = {str(getattr(k, "value", k)): v for k, v in st.replica_states.items()}.get("RUNNING", 0)
        ids = {httpx.get(url + "/healthz", timeout=30).json()["replica"] for _ in range(6)}
        if running == 2 and victim["replica"] not in ids and len(ids) == 2:
            break
        assert time.monotonic() < deadline, (running, ids)
        time.sleep(1)
    # Serve picks between two idle replicas at random: 6 requests all went to one in about 3% of runs, so
    # keep asking until both have answered (30 requests: ~2e-9 of missing one by chance)
    replies, answered = [], set()
    while len(replies) < 30 and len(answered) < 2:
        replies.append(post(url, "/v1/completions", body))
        answered |= {replies[-1].json()["replica"]} if replies[-1].status_code == 200 else set()
    assert [r.status_code for r in replies] == [200] * len(replies)
    assert len(answered) == 2 and victim["replica"] not in answered


# -- the continuous scheduler over HTTP ------------------------------------------------------------------
def small_health(url: str) -> dict:
    return httpx.get(url + "/small/healthz", timeout=30).json()


def wait_idle(url: str) -> dict:
    deadline = time.monotonic() + 60
    while (h := small_health(url))["running_sequences"] or h["queued_requests"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    return h


def test_a_short_streamed_request_finishes_while_a_long_one_decodes(url):
    long_events, short_events = [], []

    def stream(body, sink):
        with httpx.stream("POST", url + "/small/v1/completions", json=body, headers=AUTH, timeout=120) as r:
            sink.append(("replica", r.headers["x-sparta-replica"]))
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    sink.append((time.monotonic(), json.loads(line[6:])))

    long = threading.Thread(target=stream, args=({"model": "small", "prompt": token_prompt(30, 40), "max_tokens": 24,
                                                  "stream": True}, long_events))
    long.start()
    while len(long_events) < 3:   # the long one is decoding
        time.sleep(0.01)
    stream({"model": "small", "prompt": token_prompt(8, 41), "max_tokens": 2, "stream": True}, short_events)
    short_end = short_events[-1][0]
    long.join(timeout=120)
    assert short_events[0] == long_events[0]   # the same replica (there is one)
    assert short_events[-1][1]["choices"][0]["finish_reason"] == "length"
    later = [e for t, e in long_events[1:] if t > short_end]
    assert len(later) >= 5 and later[-1]["choices"][0]["finish_reason"] == "length"   # it kept going after


def test_seeded_sampling_n_and_logprobs_over_http(url, ref):
    body = {"model": "tiny", "prompt": token_prompt(24, 50), "max_tokens": 10, "temperature": 1.0, "top_p": 0.95,
            "seed": 77, "return_token_ids": True}
    alone = post(url, "/v1/completions", body).json()["choices"][0]["token_ids"]
    others = [{"model": "tiny", "prompt": token_prompt(20 + i, 60 + i), "max_tokens": 10, "temperature": 0.8}
              for i in range(5)]
    with ThreadPoolExecutor(6) as pool:   # the same request inside busy batches, on either replica
        replies = list(pool.map(lambda b: post(url, "/v1/completions", b), others[:3] + [body] + others[3:]))
    assert all(r.status_code == 200 for r in replies)
    assert replies[3].json()["choices"][0]["token_ids"] == alone
    two = post(url, "/v1/completions", {**body, "n": 2}).json()
    assert [c["index"] for c in two["choices"]] == [0, 1] and two["usage"]["completion_tokens"] == 20
    assert two["choices"][0]["token_ids"] != two["choices"][1]["token_ids"]
    # logprobs: the model's own log-softmax of the chosen tokens (completions and chat shapes)
    lp = post(url, "/v1/completions", {**body, "logprobs": 2}).json()["choices"][0]
    ids = body["prompt"] + lp["token_ids"]
    with torch.no_grad():
        logits = ref.model(torch.tensor([ids])).logits[0, len(body["prompt"]) - 1: -1]
    want = torch.log_softmax(logits.float(), -1)[torch.arange(10), torch.tensor(lp["token_ids"])]
    torch.testing.assert_close(torch.tensor(lp["logprobs"]["token_logprobs"]), want, rtol=1e-4, atol=1e-4)
    assert lp["logprobs"]["tokens"] == [ref.codec.decode([t]) for t in lp["token_ids"]]
    assert all(len(top) == 2 for top in lp["logprobs"]["top_logprobs"])
    chat = post(url, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 4, "logprobs": True, "top_logprobs": 3}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 3 and c["logprob"] <= 0 for c in content)
    assert content[0]["top_logprobs"][0]["logprob"] >= content[0]["logprob"]   # greedy here: the top one
    # streamed, each chunk carries the logprobs of its tokens
    got = events(url, "/v1/completions", {**body, "logprobs": 0, "stream": True})
    streamed = [x for e in got[:-1] for x in ((e["choices"][0].get("logprobs") or {}).get("token_logprobs") or [])]
    torch.testing.assert_close(torch.tensor(streamed), want, rtol=1e-4, atol=1e-4)


def test_a_full_pool_answers_503_with_retry_after_and_loses_nothing(url):
    wait_idle(url)
    body = {"model": "small", "prompt": token_prompt(10, 70), "max_tokens": 24}
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda i: post(url, "/small/v1/completions", {**body, "seed": i}), range(6)))
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) >= 3 and set(codes) == {200, 503}   # 2 slots + 1 waiting; the rest refused
    for r in replies:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "overloaded"
        else:
            assert r.json()["usage"]["completion_tokens"] == 24 and r.json()["choices"][0]["finish_reason"] == "length"
    assert post(url, "/small/v1/completions", {**body, "max_tokens": 2}).status_code == 200


def test_a_client_that_disconnects_frees_its_slot(url):
    wait_idle(url)
    body = {"model": "small", "prompt": token_prompt(10, 80), "max_tokens": 24, "stream": True}
    with httpx.stream("POST", url + "/small/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(3)]
        assert all(line.startswith("data: ") for line in seen if line)
        assert small_health(url)["kv_slots_used"] == 1
    # the connection is closed mid-stream: the row leaves at its next step, long before its 24 tokens
    start = time.monotonic()
    health = wait_idle(url)
    assert health["kv_slots_used"] == 0 and time.monotonic() - start < 24 * 0.05
    # and a non-streamed request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        post(url, "/small/v1/completions", {**body, "stream": False}, timeout=0.3)
    health = wait_idle(url)
    assert health["kv_slots_used"] == 0 and health["kv_used_tokens"] == 0


def test_prometheus_metrics(url):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[str, float]:
        """Each series' value (200s of /v1/completions where a series has those labels)."""
        r = httpx.get(url + "/small/metrics", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                if s.labels.get("status", "200") == "200" and s.labels.get("endpoint", "completions") == "completions":
                    assert s.labels["model"] == "small" and s.labels["replica"]
                    out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    wait_idle(url)
    before = scrape()
    r = post(url, "/small/v1/completions", {"model": "small", "prompt": token_prompt(100, 90), "max_tokens": 5})
    after = scrape()
    grew = lambda name: after[name] - before.get(name, 0.0)   # noqa: E731
    assert grew("sparta_requests_total") == 1 and grew("sparta_output_tokens_total") == 5
    assert grew("sparta_prompt_tokens_total") == 100
    assert grew("sparta_time_to_first_token_seconds_count") == 1 and grew("sparta_time_per_output_token_seconds_count") == 1
    assert grew("sparta_e2e_request_latency_seconds_count") == 1
    assert grew("sparta_art_candidate_blocks_total") == r.json()["usage"]["art"]["candidate_blocks"]
    assert grew("sparta_art_visited_blocks_total") == r.json()["usage"]["art"]["visited_blocks"]
    assert after["sparta_kv_slots"] == 2 and after["sparta_requests_queued"] == 0 and after["sparta_requests_running"] == 0
    assert after["sparta_kv_cache_usage_ratio"] == 0 and 0 <= after["sparta_art_skipped_fraction"] < 1


def test_the_openai_client_drives_the_deployment(url, ref):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert done.choices[0].text == ref.codec.decode(generate(ref, ref.codec.encode("Once upon a time"), 6))
    assert done.usage.completion_tokens == 6 and done.usage.model_extra["art"]["candidate_blocks"] > 0
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Name a planet."}],
                                          max_tokens=5, temperature=0.9, seed=3, n=2, logprobs=True, top_logprobs=2)
    assert len(chat.choices) == 2 and all(len(c.logprobs.content) == 5 for c in chat.choices)
    again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Name a planet."}],
                                           max_tokens=5, temperature=0.9, seed=3, n=2)
    assert [c.message.content for c in again.choices] == [c.message.content for c in chat.choices]
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Name a planet."}], max_tokens=5, temperature=0.9,
        seed=3, stream=True) if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content and len(pieces) > 1
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)

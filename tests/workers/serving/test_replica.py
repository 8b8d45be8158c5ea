"""The Serve replica over real HTTP: a tiny random Llama (SmolLM2's tokenizer and chat template) deployed
with 2 replicas on a local Ray and Serve bound to 127.0.0.1. Expected tokens come from the same model
loaded here and transformers' `generate`."""
from __future__ import annotations

import json
import math
import os
import signal
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
              _fail_prompt=(5, 6, 7, 8, 9))   # test-only: a batch holding exactly this prompt raises in the engine
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


def post(url: str, path: str, body, headers=AUTH, **kw) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json", **headers},
                      timeout=120, **kw)


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
    assert body["usage"] == {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32}
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
    assert max(b["art"]["batch_size"] for b in bodies) > 1   # Serve's batching put requests together
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
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


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
    ({"model": "tiny", "prompt": "x", "temperature": 0.8}, 400, "temperature", "only greedy decoding"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n", "only greedy decoding"),
    ({"model": "tiny", "prompt": "x", "best_of": 2}, 400, "best_of", "unknown parameter 'best_of'; valid: model"),
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
    replies = [post(url, "/v1/completions", body) for _ in range(6)]
    assert [r.status_code for r in replies] == [200] * 6
    answered = {r.json()["replica"] for r in replies}
    assert len(answered) == 2 and victim["replica"] not in answered

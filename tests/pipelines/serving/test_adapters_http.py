"""Many adapters in one deployment over real HTTP to real Ray Serve (local, 127.0.0.1): a tiny random Llama
served with a registered cla adapter (by its alias, models:/NAME@champion, resolved through a real MLflow
sqlite registry) and a lora adapter folder; requests pick them with `model` and decode in one batch, each
giving the greedy tokens of its own merged model (fp32). Adapters load and unload at run time with vLLM's
routes, the LRU cap evicting the least recently used; the official openai client selects them by `model`."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from mlflow import MlflowClient

import adapters
from adapters import AdapterConfig
from pipelines.serving import deploy as sv
from pipelines.serving.spec import ServeSpec
from pipelines.sweeps import tracking
from pipelines.sweeps.registry import load_registered
from workers.data.assets import load_model
from tests.helpers import free_port, trained_adapter

OVERRIDES = {"max_position_embeddings": 256}
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       **{k: os.environ[k] for k in ("SPARTA_CACHE", "TORCH_EXTENSIONS_DIR") if os.environ.get(k)}}


def base_model():
    model, _ = load_model("random:llama-tiny", task="causal_lm", dtype=torch.float32, **OVERRIDES)
    return model.eval()


def trained(method: str, seed: int, folder):
    """An adapter saved with random trained tensors (B = 0 at init would change nothing)."""
    handle = trained_adapter(base_model(), AdapterConfig(method=method, rank=4, seed=seed, chain_segments=2), seed,
                             scale=0.5)
    return handle.save(folder / method)


def merged(folder):
    return adapters.load(base_model(), folder).merge().eval()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi-adapter")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    cla = trained("cla", 1, root)
    params = {"model": "random:llama-tiny", "dataset": "movie-reviews", "method": "cla", "seed": 0, "lr": 1e-3, "rank": 4,
              "trial_key": "cla-s0", "task": "causal_lm", "model_overrides": dict(OVERRIDES)}
    final = {"step": 4, "val_accuracy": 0.7, "test_accuracy": 0.6, "val_loss": 0.5, "metric": "accuracy"}
    tracker = tracking.SweepTracker("multi-adapter-test", uri)
    with tracker:
        tracker.start(None, {"models": ["random:llama-tiny"]})
        tracker.log_trial(params, [final], final, cla)
        [reg] = tracker.finish().registered
    MlflowClient(uri).set_registered_model_alias(reg.name, "champion", reg.version)
    folders = {m: trained(m, seed, root) for seed, m in ((2, "lora"), (3, "c3la"), (4, "r_cla"))}
    spec = ServeSpec.model_validate({
        "model": "random:llama-tiny", "name": "tiny", "model_overrides": OVERRIDES, "tracking_uri": uri,
        "adapters": [{"uri": f"models:/{reg.name}@champion", "name": "cla"}, {"uri": str(folders["lora"])}],
        "max_adapters": 3, "dtype": "float32", "device": "cpu", "max_context": 256, "max_new_tokens": 48,
        "sampling": {"temperature": 0.0}, "metrics_interval_s": 0, "replicas": 1})
    assert [a.served_name for a in spec.adapters] == ["cla", "lora"]

    os.environ.update({k: v for k, v in ENV.items() if k.startswith("RAY_")})
    import ray
    from ray import serve

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": ENV}, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(sv.build_app(spec), name="multi-adapter-test", route_prefix="/")   # resolves the alias
    try:
        yield {"url": f"http://127.0.0.1:{port}", "folders": folders,
               "merged": {"cla": load_registered(f"models:/{reg.name}@champion", uri, merge=True)[0].eval(),
                          "lora": merged(folders["lora"]), "c3la": merged(folders["c3la"]),
                          "r_cla": merged(folders["r_cla"]), "tiny": base_model()}}
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def complete(url: str, model: str, ids: list[int], n: int) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": ids, "max_tokens": n, "temperature": 0, "return_token_ids": True})


def served(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]


def test_adapters_decode_in_one_batch_with_their_merged_models_tokens(deployment):
    url, ref = deployment["url"], deployment["merged"]
    models = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [("tiny", None), ("cla", "tiny"), ("lora", "tiny")]
    assert [m.get("method") for m in models[1:]] == ["cla", "lora"]
    names = ["tiny", "cla", "lora", "cla", "lora", "tiny"]
    ids = [prompt(8 + 5 * i, seed=i) for i in range(len(names))]
    with ThreadPoolExecutor(len(names)) as pool:   # at once: they share the running decode batch
        replies = list(pool.map(lambda a: complete(url, *a, 40), zip(names, ids)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    got = [r.json()["choices"][0]["token_ids"] for r in replies]
    assert got == [greedy(ref[name], p, 40) for name, p in zip(names, ids)]
    assert [r.json()["model"] for r in replies] == names
    plain = [greedy(ref["tiny"], p, 40) for p in ids]
    assert all(g != p for g, p, name in zip(got, plain, names) if name != "tiny")   # the adapters are in
    assert max(r.json()["art"]["batch_size"] for r in replies) >= 3   # rows of different adapters, one batch


def test_an_unknown_model_is_a_404_naming_the_served_ones(deployment):
    r = complete(deployment["url"], "gpt-4", [5, 6, 7], 2)
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "tiny, cla, lora" in err["message"]


def test_load_and_unload_at_run_time_with_the_lru_cap(deployment):
    url, ref, folders = deployment["url"], deployment["merged"], deployment["folders"]
    post = lambda path, body: httpx.post(url + path, json=body, timeout=120)  # noqa: E731
    bad = [post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"}),
           post("/v1/load_lora_adapter", {"lora_name": "x"}),
           post("/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": str(folders["c3la"])}),
           post("/v1/load_lora_adapter", {"lora_name": "lora", "lora_path": str(folders["c3la"])})]
    assert [r.status_code for r in bad] == [400] * 4
    assert [r.json()["error"]["param"] for r in bad] == ["lora_path", "lora_path", "lora_name", "lora_name"]
    assert served(url) == ["tiny", "cla", "lora"]   # nothing lost

    assert complete(url, "lora", [9, 9, 9], 2).status_code == 200    # cla is now the least recently used
    r = post("/v1/load_lora_adapter", {"lora_name": "c3la", "lora_path": str(folders["c3la"])})
    assert r.status_code == 200 and "added" in r.text
    assert served(url) == ["tiny", "cla", "lora", "c3la"]           # 3 adapters: the cap
    ids = prompt(20, seed=11)
    assert complete(url, "c3la", ids, 12).json()["choices"][0]["token_ids"] == greedy(ref["c3la"], ids, 12)
    r = post("/v1/load_lora_adapter", {"lora_name": "r_cla", "lora_path": str(folders["r_cla"])})
    assert r.status_code == 200
    assert served(url) == ["tiny", "lora", "c3la", "r_cla"]         # cla evicted
    assert complete(url, "cla", ids, 2).status_code == 404
    assert complete(url, "r_cla", ids, 12).json()["choices"][0]["token_ids"] == greedy(ref["r_cla"], ids, 12)
    health = httpx.get(url + "/healthz", timeout=30).json()
    assert health["adapters"] == ["lora", "c3la", "r_cla"] and health["adapter_evictions"] == 1

    r = post("/v1/unload_lora_adapter", {"lora_name": "c3la"})
    assert r.status_code == 200 and "removed" in r.text
    assert served(url) == ["tiny", "lora", "r_cla"]
    assert complete(url, "c3la", ids, 2).status_code == 404
    r = post("/v1/unload_lora_adapter", {"lora_name": "c3la"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert complete(url, "tiny", ids, 12).json()["choices"][0]["token_ids"] == greedy(ref["tiny"], ids, 12)


def test_the_openai_client_selects_adapters_by_model(deployment):
    from openai import NotFoundError, OpenAI

    url, ref = deployment["url"], deployment["merged"]
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    ids = prompt(16, seed=21)
    assert "lora" in [m.id for m in client.models.list().data]
    for name in ("lora", "tiny"):
        done = client.completions.create(model=name, prompt=ids, max_tokens=10, temperature=0,
                                         extra_body={"return_token_ids": True})
        assert done.model == name
        assert done.choices[0].model_extra["token_ids"] == greedy(ref[name], ids, 10)
    with pytest.raises(NotFoundError):
        client.completions.create(model="no-such-adapter", prompt=ids, max_tokens=2)

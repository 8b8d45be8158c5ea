"""Many adapters in one engine (workers.serving.adapter_slots over adapters.bank), without Ray: requests for
different adapters decode in the same batch and each gives the greedy tokens of its own merged model (fp32);
loading, the LRU cap, leases and unloading."""
from __future__ import annotations

import copy

import pytest
import torch

import adapters
from workers.data.assets import load_model
from workers.serving.continuous import ContinuousEngine
from workers.serving.engine import Engine, EngineConfig, Job
from workers.serving.requests import RequestError
from tests.helpers import trained_adapter

TINY = dict(model="random:llama-tiny", tokenizer="smollm2-135m", dtype="float32", device="cpu",
            model_overrides={"vocab_size": 49152, "max_position_embeddings": 512}, max_context=256,
            max_new_tokens=24, kv_cache_tokens=4 * 256, max_prefill_tokens=32)
METHODS = ("lora", "cla", "c3la", "paca")   # low-rank, selector, chained selector (rank 2r), trained columns


def base_model():
    model, _ = load_model(TINY["model"], task="causal_lm", dtype=torch.float32, **TINY["model_overrides"])
    return model.eval()


def make_adapter(folder, method: str, seed: int):
    """A saved adapter with random trained tensors (B = 0 at init would change nothing), and its merged model."""
    handle = trained_adapter(base_model(), adapters.AdapterConfig(method=method, rank=4, seed=seed, chain_segments=2),
                             seed, scale=0.5)
    path = folder / method
    handle.save(path)
    return str(path), copy.deepcopy(handle.merge())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return {m: make_adapter(folder, m, seed) for seed, m in enumerate(METHODS, start=1)}


def greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(10, 40000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_adapters_in_one_batch_give_their_merged_models_greedy_tokens(saved, scheduler):
    cfg = EngineConfig(**TINY, scheduler=scheduler, adapters={m: path for m, (path, _) in saved.items()})
    engine = ContinuousEngine(cfg) if scheduler == "continuous" else Engine(cfg)
    try:
        base = base_model()
        names = [None, *METHODS, "lora", None, "cla"]   # base rows between adapter rows, two rows per adapter
        jobs, want = [], []
        for i, name in enumerate(names):
            ids = prompt(5 + 9 * i, seed=i)   # prompts of 5..68 tokens: several prefill chunks of 32
            job = Job(ids, 12)
            if name is not None:
                job.adapter = engine.adapters.acquire(name)
            jobs.append(job)
            want.append(greedy(saved[name][1] if name else base, ids, 12))
        got = engine.run(jobs)
        assert [g.tokens for g in got] == want
        # the adapters change the tokens (so the test can fail), and differ from one another
        plain = [greedy(base, j.prompt, 12) for j in jobs]
        assert all(g.tokens != p for g, p, n in zip(got, plain, names) if n is not None)
        assert len({tuple(w) for w in want}) == len(want)
        if scheduler == "continuous":   # they shared decode batches
            assert max(g.art.batch_size for g in got) == 4
    finally:
        if scheduler == "continuous":
            engine.close()


def test_the_lru_cap_evicts_the_least_recently_used_idle_adapter(saved):
    engine = Engine(EngineConfig(**TINY, scheduler="static", max_adapters=2))
    slots = engine.adapters
    slots.load("a", saved["lora"][0])
    slots.load("b", saved["cla"][0])
    lease = slots.acquire("a")                   # "a" is now more recent than "b", and runs a request
    slots.load("c", saved["c3la"][0])            # full: "b", the least recently used, makes room
    assert slots.names() == ["a", "c"] and slots.evictions == 1
    slots.load("d", saved["paca"][0])            # "a" is least recent but running: the idle "c" goes
    assert slots.names() == ["a", "d"]
    slots.release(lease)
    slots.release(slots.acquire("d"))            # a request for "d" came and went: "a" is least recent
    slots.load("e", saved["lora"][0])
    assert slots.names() == ["d", "e"] and slots.evictions == 3
    assert slots.acquire("a") is None and slots.acquire("b") is None


def test_leases_keep_a_running_adapter_and_unload_frees_its_slot_when_it_ends(saved):
    engine = Engine(EngineConfig(**TINY, scheduler="static", max_adapters=1))
    slots = engine.adapters
    slots.load("a", saved["lora"][0])
    lease = slots.acquire("a")
    with pytest.raises(RequestError) as e:       # the only slot runs a request: nothing to evict
        slots.load("b", saved["cla"][0])
    assert e.value.status == 503 and "running requests" in e.value.message
    slots.unload("a")                             # gone for new requests at once ...
    assert slots.acquire("a") is None and slots.names() == []
    with pytest.raises(RequestError):             # ... but its slot stays until its request ends
        slots.load("b", saved["cla"][0])
    slots.release(lease)
    slots.load("b", saved["cla"][0])
    assert slots.names() == ["b"]


def test_bad_adapters_are_refused_with_the_reason(saved, tmp_path):
    engine = Engine(EngineConfig(**TINY, scheduler="static"))
    slots = engine.adapters
    with pytest.raises(RequestError, match="not a folder"):
        slots.load("x", str(tmp_path / "missing"))
    other = dict(TINY["model_overrides"], hidden_size=96)
    model, _ = load_model("random:llama-tiny", task="causal_lm", dtype=torch.float32, **other)
    handle = adapters.apply(model, adapters.AdapterConfig(method="lora", rank=4))
    handle.save(tmp_path / "wide")
    with pytest.raises(RequestError, match="another base model"):
        slots.load("x", str(tmp_path / "wide"))
    slots.load("a", saved["lora"][0])
    with pytest.raises(RequestError, match="already loaded"):
        slots.load("a", saved["cla"][0])
    assert slots.names() == ["a"]


def test_a_peft_folder_serves_as_its_sparta_adapter_does(saved, tmp_path):
    """A PEFT LoRA folder (as vLLM's load route takes) gives the tokens of the sparta adapter it was exported from."""
    for method in ("lora", "c3la"):   # chained c3la exports rank 2r with a 0/1 selection A
        adapters.load(base_model(), saved[method][0]).save(tmp_path / method, format="peft")
    engine = Engine(EngineConfig(**TINY, scheduler="static", adapters={
        "lora": saved["lora"][0], "lora-peft": str(tmp_path / "lora"), "c3la-peft": str(tmp_path / "c3la")}))
    assert [a["method"] for a in engine.adapters.describe()] == ["lora", "peft_lora", "peft_lora"]
    ids = prompt(30, seed=5)
    runs = {}
    for name in ("lora", "lora-peft", "c3la-peft"):
        job = Job(ids, 12)
        job.adapter = engine.adapters.acquire(name)
        [runs[name]] = engine.run([job])
    assert runs["lora-peft"].tokens == runs["lora"].tokens == greedy(saved["lora"][1], ids, 12)
    assert runs["c3la-peft"].tokens == greedy(saved["c3la"][1], ids, 12) != runs["lora"].tokens

"""pipelines.serving.spec, pipelines.serving.deploy and `sparta serve`: the spec's errors (field paths, valid choices),
registry models resolved to plain replica settings (a real MLflow sqlite store with a registered
adapter), and the CLI deploying a tiny model in the background on 127.0.0.1, then status and shutdown."""
from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from typer.testing import CliRunner

import adapters
from adapters import AdapterConfig
from pipelines.serving import deploy as sv
from pipelines.sweeps import tracking
from pipelines.sweeps.registry import load_registered
from pipelines.serving.local import pid_alive
from pipelines.cli import app as cli
from pipelines.serving.spec import ServeSpec, ServeSpecError, load_serve_spec
from workers.data.assets import load_model
from workers.serving.artifacts import with_local_adapters
from workers.serving.engine import Engine, EngineConfig, Job
from tests.helpers import free_port, sparta

REPO = Path(__file__).resolve().parents[3]
TINY = {"model": "random:llama-tiny", "max_context": 128, "max_new_tokens": 16}


def errors(data: dict) -> dict[str, str]:
    with pytest.raises(ServeSpecError) as e:
        ServeSpec.model_validate(data)
    return dict(e.value.errors)


# -- the spec --------------------------------------------------------------------------------------
def test_examples_validate():
    tiny = load_serve_spec(REPO / "examples/serve-tiny.yaml")
    assert tiny.served_name == "tiny" and tiny.replicas == 2 and tiny.url == "http://127.0.0.1:8000"
    assert tiny.art_config().block_size == 16 and tiny.art_config().order == "bound"   # tuned+block_size=16
    smol = load_serve_spec(REPO / "examples/serve-smollm2.yaml", port=8123)
    assert smol.served_name == "smollm2-135m" and smol.art == "tuned" and smol.url.endswith(":8123")
    assert smol.host == "127.0.0.1" and smol.api_key is None
    many = load_serve_spec(REPO / "examples/serve-adapters.yaml")
    assert many.served_name == "smollm2-135m" and [a.served_name for a in many.adapters] == ["movie-reviews"]
    assert many.art == "off" and not many.merge


BAD = [  # spec changes, the field path named, what its message must say
    ({"dtype": "fp16"}, "dtype", "'auto', 'float32' or 'bfloat16'"),
    ({"device": "tpu"}, "device", "'auto', 'cpu' or 'cuda'"),
    ({"kv": {"policy": "snap"}}, "kv.policy", "unknown KV policy 'snap'; valid: dense, streaming, snapkv"),
    ({"kv": {"ratio": 1.0}}, "kv.ratio", "less than 1"),
    ({"kv": {"policy": "dense", "keep": 3}}, "kv.keep", "unknown field 'keep'; valid fields: policy, ratio"),
    ({"art": {"preset": "tuned", "tauu": 1e-3}}, "art.tauu", "unknown ART field 'tauu'; valid: preset, mode, block_size"),
    ({"art": "turbo"}, "art", "unknown ART preset 'turbo'; valid: paper, certified, tuned, aggressive, skip, walk"),
    ({"art": "tuned+patience=0"}, "art", "patience must be an integer >= 1"),
    ({"art": {"block_size": 2048}}, "art.block_size", r"must be in [8, 1024]"),
    ({"replicas": 0}, "replicas", "at least 1 replica"),
    ({"replicas": "many"}, "replicas", "a number of replicas or {min, max, target_ongoing_requests}"),
    ({"replicas": {"min": 3, "max": 2}}, "replicas.min", "min (3) exceeds max (2)"),
    ({"replicas": {"min": 1, "max": 2, "target": 4}}, "replicas.target",
     "unknown field 'target'; valid fields: min, max, target_ongoing_requests"),
    ({"batching": {"max_batch_size": 0}}, "batching.max_batch_size", "greater than or equal to 1"),
    ({"batching": {"max_batch_size": 64}, "scheduler": {"kind": "static"}}, "max_ongoing_requests",
     "must be >= batching.max_batch_size (64)"),
    ({"scheduler": {"kind": "paged"}}, "scheduler.kind", "'continuous' or 'static'"),
    ({"scheduler": {"kv_cache_tokens": 64}}, "scheduler.kv_cache_tokens", "holds no slot of max_context (128)"),
    ({"scheduler": {"max_prefill_tokens": 8}}, "scheduler.max_prefill_tokens", "greater than or equal to 16"),
    ({"scheduler": {"max_queue": 8}}, "scheduler.max_queue", "unknown field 'max_queue'; valid fields: kind"),
    ({"sampling": {"temperature": 3.0}}, "sampling.temperature", "less than or equal to 2"),
    ({"sampling": {"top_p": 0.0}}, "sampling.top_p", "greater than 0"),
    ({"port": 70000}, "port", "less than or equal to 65535"),
    ({"max_tokens": 5}, "max_tokens", "unknown field 'max_tokens'; valid fields: model, name, route_prefix"),
    ({"max_context": 512}, "max_context", "exceeds the model's 128 positions"),
    ({"max_new_tokens": 128}, "max_new_tokens", "leaves no room for a prompt"),
    ({"model": "random:bert-tiny"}, "model", "is an encoder; serving generates text and needs a causal LM"),
    ({"model": "gpt-5"}, "model", "; valid: minilm-l6, smollm2-135m, gemma3-270m, random:bert-tiny"),
    ({"model": "models:/only-a-name"}, "model", "models:/NAME/VERSION"),
    ({"model": "models:/m/1", "adapter": str(REPO)}, "adapter", "is not a sparta adapter folder"),
    ({"tokenizer": "gpt2"}, "tokenizer", "unknown tokenizer 'gpt2'; valid: bytes, minilm-l6, smollm2-135m"),
    ({"name": "my model"}, "name", "letters, digits"),
    ({"route_prefix": "v1"}, "route_prefix", "starts with '/'"),
    ({"device": "cpu", "gpus_per_replica": 1}, "gpus_per_replica", "device cpu holds no GPU"),
    ({"adapters": ["models:/only-a-name"]}, "adapters[0].uri", "models:/NAME/VERSION (or models:/NAME@ALIAS)"),
    ({"adapters": [str(REPO)]}, "adapters[0].uri", "is not a sparta adapter folder"),
    ({"adapters": [{"uri": "models:/a/1", "nme": "x"}]}, "adapters[0].nme", "unknown field 'nme'; valid fields: uri, name"),
    ({"adapters": [{"uri": "models:/a/1", "name": "a b"}]}, "adapters[0].name", "letters, digits"),
    ({"adapters": ["models:/a/1", "models:/b/1", {"uri": "models:/c/1", "name": "b/1"}]}, "adapters", "'b/1' is taken twice"),
    ({"adapters": [{"uri": "models:/a/1", "name": "random-llama-tiny"}]}, "adapters", "the base model is served as"),
    ({"adapters": ["models:/a/1"], "model": "models:/m/1"}, "adapters", "served over a base model"),
    ({"adapters": ["models:/a/1", "models:/b/1"], "max_adapters": 1}, "max_adapters", "do not fit in max_adapters (1)"),
    ({"merge": True}, "merge", "merge: true folds one adapter into the base; adapters lists 0"),
]


@pytest.mark.parametrize("changes,path,message", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_specs_name_the_field_and_the_choices(changes, path, message):
    got = errors({**TINY, **changes})
    assert path in got, got
    assert message in got[path], got[path]


def test_every_bad_field_is_reported_at_once():
    got = errors({**TINY, "dtype": "fp8", "kv": {"policy": "x"}, "art": {"foo": 1}, "bogus": 1})
    assert set(got) == {"dtype", "kv.policy", "art.foo", "bogus"}


def test_load_errors_name_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model: random:llama-tiny\nmax_context: [\n")
    with pytest.raises(ServeSpecError, match=f"invalid serve spec {path}:\n  \\(spec\\): not valid YAML"):
        load_serve_spec(path)
    path.write_text("- a list\n")
    with pytest.raises(ServeSpecError, match="a mapping of fields"):
        load_serve_spec(path)
    with pytest.raises(ServeSpecError, match="cannot read the spec file"):
        load_serve_spec(tmp_path / "missing.yaml")


def test_art_off_in_yaml_text_means_art_off(tmp_path):
    """YAML 1.1 reads a bare off / no / false as the boolean False: in a spec that is ART off; a bare
    true / on / yes names no setting and is refused with the choices."""
    from workers.serving.requests import OFF

    path = tmp_path / "s.yaml"
    for word in ("off", "false", "no", "Off", '"off"'):
        path.write_text(f"model: random:llama-tiny\nmax_context: 128\nmax_new_tokens: 16\nart: {word}\n")
        spec = load_serve_spec(path)
        assert spec.art == "off" and spec.art_config() == OFF and not spec.art_config().active, word
    for word in ("true", "on", "yes"):
        path.write_text(f"model: random:llama-tiny\nmax_context: 128\nmax_new_tokens: 16\nart: {word}\n")
        with pytest.raises(ServeSpecError) as e:
            load_serve_spec(path)
        [(field, message)] = e.value.errors
        assert field == "art" and "is ambiguous" in message, message
        assert "paper, certified, tuned, aggressive, skip, walk" in message and "off" in message, message


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.delenv("SPARTA_API_KEY", raising=False)
    assert ServeSpec.model_validate(TINY).resolved_api_key() is None
    monkeypatch.setenv("SPARTA_API_KEY", "from-env")
    assert ServeSpec.model_validate(TINY).resolved_api_key() == "from-env"
    assert ServeSpec.model_validate({**TINY, "api_key": "from-spec"}).resolved_api_key() == "from-spec"
    monkeypatch.setenv("MY_KEY", "mine")
    assert ServeSpec.model_validate({**TINY, "api_key_env": "MY_KEY"}).resolved_api_key() == "mine"


def test_replica_settings_and_deployment_options():
    spec = ServeSpec.model_validate({**TINY, "art": {"preset": "tuned", "tau": 1e-3}, "kv": {"policy": "quest",
                                     "ratio": 0.25}, "replicas": {"min": 1, "max": 3, "target_ongoing_requests": 4},
                                     "cpus_per_replica": 2, "dtype": "float32"})
    cfg = sv.engine_config(spec, sv.resolve_model(spec))
    assert cfg["model"] == "random:llama-tiny" and cfg["name"] == "random-llama-tiny" and cfg["threads"] == 2
    assert cfg["policy"] == "quest" and cfg["policy_ratio"] == 0.25 and cfg["art"]["tau"] == 1e-3
    EngineConfig(**cfg)   # plain values the replica takes as they are
    opts = sv.deployment_options(spec)
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
                                          "target_ongoing_requests": 4.0}
    assert "num_replicas" not in opts and opts["ray_actor_options"]["num_cpus"] == 2
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    fixed = sv.deployment_options(ServeSpec.model_validate({**TINY, "replicas": 2, "device": "cuda"}))
    assert fixed["num_replicas"] == 2 and fixed["ray_actor_options"]["num_gpus"] == 1
    # the scheduler: continuous by default, its pool in slots of max_context, OpenAI's sampling defaults
    assert cfg["scheduler"] == "continuous" and cfg["kv_cache_tokens"] == 8 * spec.max_context == spec.kv_slots * 128
    assert cfg["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    assert opts["max_ongoing_requests"] == 8 + 64 + 1   # slots + max_queued + 1: a full replica answers 503 itself
    static = ServeSpec.model_validate({**TINY, "scheduler": {"kind": "static"}, "sampling": {"temperature": 0.0}})
    scfg = sv.engine_config(static, sv.resolve_model(static))
    assert scfg["scheduler"] == "static" and scfg["sampling"]["temperature"] == 0.0
    assert sv.deployment_options(static)["max_ongoing_requests"] == 32
    assert sv.engine_config(ServeSpec.model_validate(TINY), sv.resolve_model(ServeSpec.model_validate(TINY)))["art"] is None


# -- registry models -------------------------------------------------------------------------------
OVERRIDES = {"max_position_embeddings": 256}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One finished trial of random:llama-tiny with a (perturbed) cla adapter, registered as best."""
    root = tmp_path_factory.mktemp("serve-registry")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    model, _ = load_model("random:llama-tiny", task="causal_lm", **OVERRIDES)
    handle = adapters.apply(model, AdapterConfig(method="cla", rank=4, seed=0))
    with torch.no_grad():   # as if trained: B = 0 would make the adapter a no-op
        for p in handle.adapter_parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    folder = handle.save(root / "adapter")
    params = {"model": "random:llama-tiny", "dataset": "movie-reviews", "method": "cla", "seed": 0, "lr": 1e-3,
              "rank": 4, "trial_key": "cla-s0", "task": "causal_lm", "model_overrides": dict(OVERRIDES)}
    final = {"step": 4, "val_accuracy": 0.7, "test_accuracy": 0.6, "val_loss": 0.5, "metric": "accuracy"}
    tracker = tracking.SweepTracker("serve-test", uri)
    with tracker:
        tracker.start(None, {"models": ["random:llama-tiny"]})
        run_id = tracker.log_trial(params, [final], final, folder)
        result = tracker.finish()
    [reg] = result.registered
    return {"uri": uri, "name": reg.name, "version": reg.version, "run_id": run_id, "adapter": folder}


def _greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_registered_model_resolves_to_its_base_and_adapter(registry, tmp_path):
    spec = ServeSpec.model_validate({"model": f"models:/{registry['name']}/{registry['version']}",
                                     "tracking_uri": registry["uri"], "max_context": 256, "max_new_tokens": 16,
                                     "dtype": "float32"})
    assert spec.served_name == registry["name"]
    got = sv.resolve_model(spec)
    assert got.model == "random:llama-tiny" and got.model_overrides == OVERRIDES
    assert (Path(got.adapter) / "adapter_config.json").is_file()
    # the replica gets where the adapter lies in MLflow, pinned to the version, and downloads it itself
    cfg = sv.engine_config(spec, got)
    assert cfg["adapter"]["source"] == f"models:/{registry['name']}/{registry['version']}"
    assert cfg["adapter"]["tracking_uri"] == registry["uri"]
    replica_cfg = with_local_adapters(cfg, tmp_path / "replica-node")
    assert Path(replica_cfg["adapter"]).parent == tmp_path / "replica-node"
    assert Path(replica_cfg["adapter"], "adapter_model.safetensors").read_bytes() == \
        Path(registry["adapter"], "adapter_model.safetensors").read_bytes()
    engine = Engine(EngineConfig(**replica_cfg))
    assert type(engine.codec.tok).__name__ == "ByteTokenizer"   # what tiny models are trained with
    ids = engine.codec.encode("great movie, loved it")
    [done] = engine.run([Job(ids, 8)])
    merged, _ = load_registered(spec.model, registry["uri"], merge=True)
    assert done.tokens == _greedy(merged, ids, 8)
    base, _ = load_model("random:llama-tiny", task="causal_lm", **OVERRIDES)
    assert done.tokens != _greedy(base.eval(), ids, 8)   # the adapter is really in
    # a trial's run holds the raw adapter folder; its params name the base model
    run_uri = f"runs:/{registry['run_id']}/adapter"
    by_run = sv.resolve_model(ServeSpec.model_validate({**spec.model_dump(), "model": run_uri}))
    assert by_run.model == "random:llama-tiny" and by_run.model_overrides == OVERRIDES
    assert Path(by_run.adapter, "adapter_model.safetensors").read_bytes() == \
        Path(registry["adapter"], "adapter_model.safetensors").read_bytes()
    fetched = with_local_adapters(sv.engine_config(spec, by_run), tmp_path / "replica-node")["adapter"]
    assert Path(fetched, "adapter_model.safetensors").read_bytes() == \
        Path(registry["adapter"], "adapter_model.safetensors").read_bytes()


def test_adapters_resolve_by_alias_and_merge_folds_one(registry, tmp_path):
    from mlflow import MlflowClient

    MlflowClient(registry["uri"]).set_registered_model_alias(registry["name"], "champion", registry["version"])
    base = {"model": "random:llama-tiny", "model_overrides": OVERRIDES, "tracking_uri": registry["uri"],
            "max_context": 256, "max_new_tokens": 16, "dtype": "float32"}
    spec = ServeSpec.model_validate({**base, "adapters": [f"models:/{registry['name']}@champion",
                                                          {"uri": str(registry["adapter"]), "name": "local"}]})
    got = sv.resolve_model(spec)
    alias = f"{registry['name']}@champion"
    assert list(got.adapters) == [alias, "local"] and got.adapter is None and got.model == "random:llama-tiny"
    assert Path(got.adapters[alias], "adapter_model.safetensors").read_bytes() == \
        Path(registry["adapter"], "adapter_model.safetensors").read_bytes()
    cfg = sv.engine_config(spec, got)
    assert cfg["adapters"]["local"] == str(registry["adapter"])   # a folder: as given
    # the alias: pinned to the version it names now (every replica serves that one, wherever the alias moves)
    assert cfg["adapters"][alias]["source"] == f"models:/{registry['name']}/{registry['version']}"
    fetched = with_local_adapters(cfg, tmp_path / "replica-node")["adapters"]
    assert fetched["local"] == str(registry["adapter"])
    assert Path(fetched[alias], "adapter_model.safetensors").read_bytes() == \
        Path(registry["adapter"], "adapter_model.safetensors").read_bytes()
    assert cfg["max_adapters"] == 16 and cfg["runtime_adapters"] is True
    merged = ServeSpec.model_validate({**base, "adapters": [{"uri": f"models:/{registry['name']}@champion",
                                                             "name": "best"}], "merge": True})
    assert merged.served_name == "best"
    folded = sv.resolve_model(merged)
    assert folded.adapters == {} and Path(folded.adapter, "adapter_config.json").is_file()
    assert sv.engine_config(merged, folded)["runtime_adapters"] is False   # nothing to add adapters to
    # an adapter of another base, or trained with other model overrides, is refused naming its entry
    other = ServeSpec.model_validate({**base, "model": "random:qwen2-tiny", "adapters": [f"models:/{registry['name']}/1"]})
    with pytest.raises(ServeSpecError, match=r"adapters\[0\].uri: .* adapts random:llama-tiny, not this deployment's"):
        sv.resolve_model(other)
    bare = ServeSpec.model_validate({**base, "model_overrides": {}, "max_context": 64,
                                     "adapters": [f"models:/{registry['name']}/1"]})
    with pytest.raises(ServeSpecError, match=r"adapters\[0\].uri: .* was trained with model_overrides"):
        sv.resolve_model(bare)


def test_registry_errors_name_the_field(registry):
    base = {"tracking_uri": registry["uri"], "max_context": 256, "max_new_tokens": 16}
    with pytest.raises(ServeSpecError, match=r"model: cannot resolve models:/nothing-here/1 in sqlite") as e:
        sv.resolve_model(ServeSpec.model_validate({**base, "model": "models:/nothing-here/1"}))
    assert e.value.errors[0][0] == "model"
    too_long = ServeSpec.model_validate({**base, "max_context": 1024,
                                         "model": f"models:/{registry['name']}/{registry['version']}"})
    with pytest.raises(ServeSpecError, match="max_context: max_context .1024. exceeds the model's 256 positions"):
        sv.resolve_model(too_long)


# -- the CLI ---------------------------------------------------------------------------------------
def test_cli_rejects_a_bad_spec_before_starting_anything(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY, "kv": {"policy": "snap"}, "art": "turbo"}))
    for command in (["serve", "deploy", str(path), "--state", str(tmp_path / "s.json")], ["serve", "run", str(path)]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2, result.output
        assert "kv.policy: unknown KV policy 'snap'" in result.output and "art: unknown ART preset 'turbo'" in result.output
    assert not (tmp_path / "s.json").exists()
    result = CliRunner().invoke(cli, ["serve", "status", "--state", str(tmp_path / "s.json")])
    assert result.exit_code == 1 and "no local deployment is running" in result.output






@pytest.mark.slow
def test_cli_deploy_status_shutdown(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")   # the deployment's run
    state, port = tmp_path / "state.json", free_port()
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "examples/serve-tiny.yaml").read_text()),
                                    "replicas": 1, "api_key": "k"}))
    deployed = sparta("serve", "deploy", str(spec), "--port", str(port), "--state", str(state))
    pid = json.loads(state.read_text())["pid"] if state.exists() else None
    try:
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        url = f"http://127.0.0.1:{port}"
        assert deployed.stdout.strip() == url
        reply = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                           json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
        again = sparta("serve", "deploy", str(spec), "--port", str(free_port()), "--state", str(state))
        assert again.returncode == 1 and "running already" in again.stderr
        status = sparta("serve", "status", "--state", str(state), "--json")
        assert status.returncode == 0, status.stderr[-3000:]
        info = json.loads(status.stdout)
        assert info["health"]["status"] == "ok" and info["local"]["pid"] == pid
        [row] = info["applications"]
        assert row["application"] == "tiny" and row["status"] == "RUNNING" and row["replicas"] == {"RUNNING": 1}
        stopped = sparta("serve", "shutdown", "--state", str(state))
        assert stopped.returncode == 0 and "stopped tiny" in stopped.stdout, stopped.stderr[-3000:]
        assert not pid_alive(pid) and not state.exists()
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/healthz", timeout=5)
    finally:
        if pid is not None and pid_alive(pid):   # the process this test started, by its pid
            os.kill(pid, 15)

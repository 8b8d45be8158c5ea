"""Replica metrics in the deployment's MLflow run: the reporter against a real sqlite store, and the tiny
spec deployed by `sparta serve deploy` (2 replicas on 127.0.0.1) reporting every second, its run
FINISHED by `sparta serve shutdown`."""
from __future__ import annotations

import json
import os
import time

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from pipelines.serving import deploy as sv
from pipelines.serving.local import pid_alive
from pipelines.serving.metrics_run import open_metrics_run
from pipelines.serving.spec import ServeSpec
from tests.helpers import free_port, sparta
from tests.pipelines.serving.test_deploy import REPO, TINY
from workers.serving.metrics import MetricsReporter


def test_reporter_logs_totals_and_interval_statistics(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = ServeSpec.model_validate({**TINY, "metrics_interval_s": 5, "tracking_uri": uri, "api_key": "secret"})
    run = open_metrics_run(spec, sv.resolve_model(spec))
    client = MlflowClient(uri)
    params = client.get_run(run.run_id).data.params
    assert params["model"] == "random:llama-tiny" and params["max_context"] == "128"
    assert params["metrics_interval_s"] == "5.0" and "api_key" not in params   # the key stays secret
    reporter = MetricsReporter(run.tracking_uri, run.run_id, 60, "r1")
    for status in (200, 200, 200, 404):
        reporter.request(status)
    for tokens, seconds, skipped in ((4, 1.0, 0.0), (6, 2.0, 0.5), (8, 3.0, 0.25)):
        reporter.completion(tokens, seconds, skipped)
    assert reporter.report()
    got = client.get_run(run.run_id).data.metrics
    assert got["requests/r1"] == 4 and got["errors/r1"] == 1 and got["output_tokens/r1"] == 18
    assert got["latency_p50_s/r1"] == 2.0 and got["latency_p99_s/r1"] == pytest.approx(2.98)
    assert got["skipped_fraction/r1"] == pytest.approx(0.25) and got["output_tokens_per_s/r1"] > 0
    reporter.request(200)
    assert reporter.report()   # totals go on; an empty interval has no latency or skipped point
    history = client.get_metric_history(run.run_id, "requests/r1")
    assert [(m.step, m.value) for m in history] == [(0, 4), (1, 5)]
    assert [m.step for m in client.get_metric_history(run.run_id, "latency_p50_s/r1")] == [0]
    run.end()
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert open_metrics_run(ServeSpec.model_validate({**TINY, "metrics_interval_s": 0})) is None


def test_a_store_that_refuses_keeps_the_interval(tmp_path):
    reporter = MetricsReporter(f"sqlite:///{tmp_path}/none.db", "no-such-run", 60, "r1")
    reporter.completion(3, 1.0, 0.1)
    assert not reporter.report()   # logged as a warning; the replica goes on
    assert reporter.snapshot()["output_tokens"] == 3 and reporter.snapshot()["latency_p50_s"] == 1.0


def _latest(client: MlflowClient, run_id: str, name: str) -> dict[str, tuple[float, int]]:
    """replica id -> (latest value, its timestamp in ms) of metric `name`."""
    out = {}
    for key in client.get_run(run_id).data.metrics:
        if key.startswith(name + "/"):
            last = max(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
            out[key.split("/", 1)[1]] = (last.value, last.timestamp)
    return out


@pytest.mark.slow
def test_deployment_run_gets_exact_counts_and_finishes(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)   # the deployed process and its replicas inherit it
    state, port = tmp_path / "state.json", free_port()
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "examples/serve-tiny.yaml").read_text()),
                                    "metrics_interval_s": 1}))
    deployed = sparta("serve", "deploy", str(spec), "--port", str(port), "--state", str(state))
    pid = json.loads(state.read_text())["pid"] if state.exists() else None
    try:
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        client = MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("sparta-serve").experiment_id])
        assert run.info.status == "RUNNING" and run.data.tags["sparta.serve.app"] == "tiny"
        assert run.data.params["model"] == "random:llama-tiny" and run.data.params["replicas"] == "2"
        assert run.data.params["art"] == "tuned+block_size=16" and run.data.params["metrics_interval_s"] == "1.0"
        url, sent_tokens = f"http://127.0.0.1:{port}", 0
        for i in range(8):   # both endpoints, streamed and not
            if i % 2:
                r = httpx.post(url + "/v1/completions", timeout=60, json={"model": "tiny", "prompt": f"n{i}",
                                                                        "max_tokens": 3 + i})
                assert r.status_code == 200
                sent_tokens += r.json()["usage"]["completion_tokens"]
            else:
                with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
                        "model": "tiny", "messages": [{"role": "user", "content": f"m{i}"}], "max_tokens": 2 + i,
                        "stream": True, "stream_options": {"include_usage": True}}) as r:
                    usage = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")][-1]
                sent_tokens += usage["usage"]["completion_tokens"]
        bad = httpx.post(url + "/v1/completions", timeout=60, json={"model": "tiny", "prompt": "x", "max_tokens": 0})
        assert bad.status_code == 400
        last_sent_ms = time.time() * 1000
        deadline = time.monotonic() + 60
        while True:   # wait until both replicas have reported after the last request
            requests = _latest(client, run.info.run_id, "requests")
            if len(requests) == 2 and all(ts > last_sent_ms for _, ts in requests.values()):
                break
            assert time.monotonic() < deadline, requests
            time.sleep(0.5)
        tokens = _latest(client, run.info.run_id, "output_tokens")
        errors = _latest(client, run.info.run_id, "errors")
        assert sum(v for v, _ in requests.values()) == 9 and sum(v for v, _ in errors.values()) == 1
        assert sum(v for v, _ in tokens.values()) == sent_tokens
        skipped = _latest(client, run.info.run_id, "skipped_fraction")
        assert skipped and all(0.0 <= v <= 1.0 for v, _ in skipped.values())
        assert len(client.get_metric_history(run.info.run_id, f"requests/{next(iter(requests))}")) >= 2   # periodic
        stopped = sparta("serve", "shutdown", "--state", str(state))
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        assert client.get_run(run.info.run_id).info.status == "FINISHED"
    finally:
        if pid is not None and pid_alive(pid):   # the process this test started, by its pid
            os.kill(pid, 15)

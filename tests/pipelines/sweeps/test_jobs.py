"""A sweep submitted with `sparta sweep run --address` to a real two-node Ray cluster (`ray start --head`
plus `ray start --address`), followed with `sparta sweep status|logs`, tracked by an MLflow tracking server
on PostgreSQL, as on a cluster.

Ray refuses a second node unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, and with it Ray binds the machine's
interface address. So the cluster lives in a private network namespace whose only interface is loopback:
every node is 127.0.0.1, nothing can bind anything else, and the host's ports are untouched. Token
authentication is on, as on a real cluster.

MLflow is what a cluster runs: `mlflow server` (started by the test, in the namespace) on a PostgreSQL
database (Debian's server binaries, run as the `postgres` user in a folder of the test's), serving
artifacts itself (`--serve-artifacts`) from a folder only it writes. The sweep gets only the server's
URL: runs, adapters and registered models go over HTTP, and the test reads them back through the server.
The one folder both nodes share is the sweep's storage (Tune state and checkpoints: `--storage`, what a
cluster puts on NFS)."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "examples" / "sweep-tiny.yaml"
GCS, DASHBOARD = 6379, 8265          # free by construction: the namespace is new
PG_PORT, MLFLOW_PORT = 5432, 5000
PG_BIN = Path("/usr/lib/postgresql/15/bin")   # Debian's postgresql-15 (the machine's package)
pytestmark = pytest.mark.slow

NODES = """
import json, ray
ray.init(address="127.0.0.1:%d", log_to_driver=False)
print(json.dumps([{"id": n["NodeID"], "alive": n["Alive"], "ip": n["NodeManagerAddress"],
                   "head": "node:__internal_head__" in n["Resources"], "cpus": n["Resources"].get("CPU", 0)}
                  for n in ray.nodes()]))
""" % GCS


class LoopbackNamespace:
    """A network namespace with only `lo`, kept alive by a sleeping process; commands enter it with nsenter."""

    def __init__(self):
        self.holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
        host_ns = os.readlink("/proc/self/ns/net")
        deadline = time.time() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/net") == host_ns:   # until unshare has happened
            assert self.holder.poll() is None and time.time() < deadline, "could not create a network namespace"
            time.sleep(0.05)
        subprocess.run(self.argv("ip", "link", "set", "lo", "up"), check=True)
        addrs = subprocess.run(self.argv("ip", "-o", "addr"), check=True, capture_output=True, text=True).stdout
        assert {line.split()[1] for line in addrs.splitlines()} == {"lo"}, addrs

    def argv(self, *cmd: str) -> list[str]:
        return ["nsenter", f"--target={self.holder.pid}", "--net", "--", *cmd]

    def close(self):
        self.holder.kill()
        self.holder.wait()


def stop(proc: subprocess.Popen) -> None:
    """Stop a `ray start --block` node by PID: SIGTERM makes it stop its own Ray processes; anything of it
    still alive after that is killed by PID."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(family, timeout=30)
    for p in alive:
        p.kill()


@pytest.fixture
def cluster(tmp_path):
    """A head node holding no CPUs (so trials must run on the worker node) and a worker node with 2."""
    ns = LoopbackNamespace()
    # one temp dir per node, as on separate machines (a shared one lets a node's runtime-env agent delete
    # the other's unpacked working directory); short paths: Ray's sockets live there
    temp_dirs = [tempfile.mkdtemp(prefix="sparta-ray-", dir="/tmp") for _ in range(2)]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",   # safe: the namespace has only loopback
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # as on a cluster node set up for the project: its `python` (a job's entrypoint) has sparta
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    ray = str(Path(sys.executable).parent / "ray")
    logs = tmp_path / "nodes"
    logs.mkdir()
    nodes = []
    try:
        nodes.append(subprocess.Popen(
            ns.argv(ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={GCS}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD}", "--num-cpus=0",
                    f"--temp-dir={temp_dirs[0]}", "--disable-usage-stats"),
            env=env, stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT))
        wait_for_nodes(ns, env, 1, nodes)
        nodes.append(subprocess.Popen(
            ns.argv(ray, "start", "--block", f"--address=127.0.0.1:{GCS}", "--node-ip-address=127.0.0.1",
                    "--num-cpus=2", f"--temp-dir={temp_dirs[1]}"),
            env=env, stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT))
        yield ns, env, wait_for_nodes(ns, env, 2, nodes)
    finally:
        for proc in reversed(nodes):
            stop(proc)
        ns.close()
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def wait_for_nodes(ns, env, n: int, procs, timeout: float = 120) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        assert all(p.poll() is None for p in procs), "a `ray start` exited; see its log under tmp_path/nodes"
        out = subprocess.run(ns.argv(sys.executable, "-c", NODES), env=env, capture_output=True, text=True)
        if out.returncode == 0:
            nodes = [node for node in json.loads(out.stdout.strip().splitlines()[-1]) if node["alive"]]
            if len(nodes) == n:
                return nodes
        assert time.time() < deadline, f"cluster did not reach {n} nodes: {out.stderr[-2000:]}"
        time.sleep(2)


def in_namespace(ns, env, code: str, timeout: float = 300) -> dict:
    """Run Python `code` in the namespace (where the servers are); it prints one JSON line, returned."""
    out = subprocess.run(ns.argv(sys.executable, "-c", code), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_until(ns, env, check: str, procs, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while subprocess.run(ns.argv(*check.split()), env=env, capture_output=True).returncode != 0:
        assert all(p.poll() is None for p in procs), f"{what} exited; see its log under tmp_path/servers"
        assert time.time() < deadline, f"{what} did not come up in {timeout:.0f} s"
        time.sleep(1)


@pytest.fixture
def tracking_server(cluster, tmp_path):
    """PostgreSQL and an MLflow tracking server on it, both on 127.0.0.1 in the cluster's namespace:
    (tracking URI, the folder the server keeps artifacts in)."""
    ns, env, _ = cluster
    assert (PG_BIN / "postgres").is_file(), f"no PostgreSQL server at {PG_BIN}: install Debian's postgresql-15"
    # postgres refuses to run as root: its folder belongs to the postgres user; short path (its socket)
    home = Path(tempfile.mkdtemp(prefix="sparta-pg-", dir="/tmp"))
    shutil.chown(home, "postgres")
    logs = tmp_path / "servers"
    logs.mkdir()
    artifacts = tmp_path / "mlflow-server-artifacts"
    as_postgres = ["runuser", "-u", "postgres", "--"]
    procs = []
    try:
        subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(home / "data"), "-A", "trust", "-U", "postgres",
                        "--no-sync"], check=True, capture_output=True)
        procs.append(subprocess.Popen(
            ns.argv(*as_postgres, str(PG_BIN / "postgres"), "-D", str(home / "data"), "-k", str(home),
                    "-h", "127.0.0.1", "-p", str(PG_PORT), "-c", "fsync=off"),
            stdout=open(logs / "postgres.log", "w"), stderr=subprocess.STDOUT))
        wait_until(ns, env, f"{PG_BIN / 'pg_isready'} -h 127.0.0.1 -p {PG_PORT}", procs, "postgres")
        subprocess.run(ns.argv("psql", "-h", "127.0.0.1", "-p", str(PG_PORT), "-U", "postgres", "-c",
                               "CREATE DATABASE mlflow"), check=True, capture_output=True)
        procs.append(subprocess.Popen(
            ns.argv(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(MLFLOW_PORT),
                    "--workers", "1", "--backend-store-uri",
                    f"postgresql+psycopg2://postgres@127.0.0.1:{PG_PORT}/mlflow",
                    "--serve-artifacts", "--artifacts-destination", str(artifacts)),
            cwd=tmp_path, env=env, stdout=open(logs / "mlflow.log", "w"), stderr=subprocess.STDOUT))
        wait_until(ns, env, f"curl -sf http://127.0.0.1:{MLFLOW_PORT}/health", procs, "the MLflow server")
        yield f"http://127.0.0.1:{MLFLOW_PORT}", artifacts
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(home, ignore_errors=True)


READ_BACK = """
import json, sys
from mlflow import MlflowClient
from pipelines.sweeps.registry import load_registered
uri, name = sys.argv[1], sys.argv[2]
client = MlflowClient(uri)
exp = client.get_experiment_by_name("sweep-cluster")
trials = client.search_runs([exp.experiment_id], "tags.`sparta.role` = 'trial'")
(parent,) = client.search_runs([exp.experiment_id], "tags.`sparta.role` = 'sweep'")
champion = client.get_model_version_by_alias(name, "champion")
model, _ = load_registered(f"models:/{name}@champion", tracking_uri=uri)   # downloaded through the server
print(json.dumps({
    "trials": [{"method": r.data.params["method"], "status": r.info.status, "node": r.data.tags["sparta.ray_node_id"],
                "metrics": sorted(r.data.metrics), "artifact_uri": r.info.artifact_uri,
                "adapter": sorted(f.path for f in client.list_artifacts(r.info.run_id, "adapter"))} for r in trials],
    "parent": {"status": parent.info.status, "trials": parent.data.metrics.get("trials"), "id": parent.info.run_id},
    "champion": {"version": champion.version, "run_id": champion.run_id, "source": champion.source},
    "loaded_params": sum(p.numel() for p in model.parameters()),
}))
"""


def sparta(ns, env, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(ns.argv(sys.executable, "-m", "pipelines.cli", "sweep", *args), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_sweep_submitted_to_a_two_node_loopback_cluster(cluster, tracking_server, tmp_path):
    ns, env, nodes = cluster
    uri, server_artifacts = tracking_server
    assert {n["ip"] for n in nodes} == {"127.0.0.1"} and sorted(n["head"] for n in nodes) == [False, True]
    worker_node = next(n["id"] for n in nodes if not n["head"])

    spec = yaml.safe_load(TINY.read_text())
    spec.update(experiment="sweep-cluster", seeds=[0], max_concurrent=2)   # lora and cla side by side
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    address = f"http://127.0.0.1:{DASHBOARD}"

    submitted = sparta(ns, env, "run", str(path), "--address", address, "--tracking-uri", uri,
                       "--storage", str(tmp_path / "sweeps"))
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"as Ray Job (\S+)", submitted.stdout).group(1)
    early = sparta(ns, env, "status", job, "--address", address).stdout.strip()
    assert early in ("PENDING", "RUNNING", "SUCCEEDED"), sparta(ns, env, "logs", job, "--address", address).stdout[-3000:]

    done = sparta(ns, env, "status", job, "--address", address, "--wait", timeout=900)
    logs = sparta(ns, env, "logs", job, "--address", address).stdout
    (tmp_path / "job.log").write_text(logs)
    assert (done.returncode, done.stdout.strip()) == (0, "SUCCEEDED"), f"{logs[-3000:]}\n(all of it: {tmp_path}/job.log)"
    assert "registered models:/" in logs and "sweep 'sweep-cluster' done" in logs

    # everything read back through the server (the test process is outside the namespace)
    name = "sparta-minilm-l6-movie-reviews-binary"
    got = in_namespace(ns, env, READ_BACK.replace("sys.argv[1], sys.argv[2]", f"{uri!r}, {name!r}"))
    trials = got["trials"]
    assert sorted(t["method"] for t in trials) == ["cla", "lora"]
    assert all(t["status"] == "FINISHED" and "final/test_accuracy" in t["metrics"] for t in trials)
    # the head holds no CPUs: every trial's workers ran on the second node
    assert {t["node"] for t in trials} == {worker_node}
    assert got["parent"]["status"] == "FINISHED" and got["parent"]["trials"] == 2
    # artifacts went over HTTP into the server's own folder, and nowhere else
    for t in trials:
        assert t["artifact_uri"].startswith("mlflow-artifacts:/")
        assert "adapter/adapter_model.safetensors" in t["adapter"]
    assert len(list(server_artifacts.rglob("adapter_model.safetensors"))) >= 3   # 2 trials + the registered model
    assert not list(tmp_path.rglob("mlflow.db")) and not (ROOT / "mlruns" / "artifacts" / "sweep-cluster").exists()
    # the registry resolves through the server: the champion alias, its model downloaded and loaded
    assert got["champion"]["version"] == "1" and got["loaded_params"] > 20_000_000

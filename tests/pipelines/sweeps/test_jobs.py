"""A sweep submitted with `sparta sweep run --address` to a real two-node Ray cluster (`ray start --head`
plus `ray start --address`), followed with `sparta sweep status|logs`, landing in MLflow.

Ray refuses a second node unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, and with it Ray binds the machine's
interface address. So the cluster lives in a private network namespace whose only interface is loopback:
every node is 127.0.0.1, nothing can bind anything else, and the host's ports are untouched. The file
system is shared, so the test reads the job's MLflow store directly. Token authentication is on, as on a
real cluster."""
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
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "examples" / "sweep-tiny.yaml"
GCS, DASHBOARD = 6379, 8265          # free by construction: the namespace is new
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


def sparta(ns, env, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(ns.argv(sys.executable, "-m", "pipelines.cli", "sweep", *args), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_sweep_submitted_to_a_two_node_loopback_cluster(cluster, tmp_path):
    ns, env, nodes = cluster
    assert {n["ip"] for n in nodes} == {"127.0.0.1"} and sorted(n["head"] for n in nodes) == [False, True]
    worker_node = next(n["id"] for n in nodes if not n["head"])

    spec = yaml.safe_load(TINY.read_text())
    spec.update(experiment="sweep-cluster", seeds=[0], max_concurrent=2)   # lora and cla side by side
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
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

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-cluster")
    runs = client.search_runs([exp.experiment_id], "tags.`sparta.role` = 'trial'")
    assert sorted(r.data.params["method"] for r in runs) == ["cla", "lora"]
    assert all(r.info.status == "FINISHED" and "final/test_accuracy" in r.data.metrics for r in runs)
    # the head holds no CPUs: every trial's workers ran on the second node
    assert {r.data.tags["sparta.ray_node_id"] for r in runs} == {worker_node}
    (parent,) = client.search_runs([exp.experiment_id], "tags.`sparta.role` = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials"] == 2
    assert client.search_model_versions("name = 'sparta-minilm-l6-movie-reviews-binary'")

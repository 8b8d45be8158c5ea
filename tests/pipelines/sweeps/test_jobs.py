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
cluster puts on NFS).

Faults, as a cluster has them: the worker node's raylet killed mid-sweep and a node started again (Tune
restarts each trial, Ray Train resumes it from its last checkpoint), and the driver killed mid-sweep, the
sweep then resumed with `sparta sweep resume --address` as a new Ray Job. The module's tests share one
cluster and one server."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from workers.data.assets import cache_dir


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


def process_name(p: psutil.Process) -> str | None:
    """Its name, or None for a process that has just exited (a node starts and ends workers all the time)."""
    try:
        return p.name()
    except psutil.NoSuchProcess:
        return None


class LoopbackCluster:
    """Ray nodes started with `ray start --block` in a loopback namespace, each with its own temp dir (as on
    separate machines: a shared one lets a node's runtime-env agent delete the other's unpacked working
    directory); stopped by PID."""

    def __init__(self, logs: Path):
        self.ns = LoopbackNamespace()
        self.logs = logs
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",   # safe: the namespace has only loopback
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    # as on a cluster node set up for the project: its `python` (a job's entrypoint) has sparta
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    # where the built-in datasets' source files lie: sweeps pass it on to their trials
                    "SPARTA_CACHE": str(cache_dir())}
        self.ray = str(Path(sys.executable).parent / "ray")
        self.nodes: list[subprocess.Popen] = []
        self.temp_dirs: list[str] = []
        self.orphans: list[psutil.Process] = []   # processes of a node whose raylet was killed
        self.node_cache: dict[int, Path] = {}        # a worker node's SPARTA_CACHE, by its `ray start` PID

    def _start(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        # short paths: Ray's sockets live in the temp dir
        self.temp_dirs.append(tempfile.mkdtemp(prefix="sparta-ray-", dir="/tmp"))
        proc = subprocess.Popen(self.ns.argv(self.ray, "start", "--block", "--node-ip-address=127.0.0.1",
                                             f"--temp-dir={self.temp_dirs[-1]}", *args),
                                env={**self.env, **(env or {})}, stdout=open(self.logs / f"{name}.log", "w"),
                                stderr=subprocess.STDOUT)
        self.nodes.append(proc)
        return proc

    def start_head(self) -> None:
        """A head node holding no CPUs: trials (and their Tune trainables) must run on worker nodes."""
        self._start("head", "--head", f"--port={GCS}", "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD}",
                    "--num-cpus=0", "--disable-usage-stats")
        wait_for_nodes(self, 1)

    def add_worker(self) -> subprocess.Popen:
        """A worker node with 2 CPUs and a sparta cache of its own (`node_cache`): what runs there without
        a runtime env saying otherwise (a Serve replica deployed from elsewhere) caches on its own disk."""
        alive, name = len(self.live()), f"worker-{len(self.temp_dirs)}"
        cache = self.logs.parent / f"{name}-cache"
        proc = self._start(name, f"--address=127.0.0.1:{GCS}", "--num-cpus=2", env={"SPARTA_CACHE": str(cache)})
        self.node_cache[proc.pid] = cache
        wait_for_nodes(self, alive + 1)
        return proc

    def live(self) -> list[subprocess.Popen]:
        return [p for p in self.nodes if p.poll() is None]

    def kill_raylet(self, node: subprocess.Popen) -> int:
        """Lose a node as a machine is lost: SIGKILL its raylet by PID. Its other processes (the `ray start`,
        agents, workers) are left to notice; whatever of them is still alive is killed at close."""
        family = psutil.Process(node.pid).children(recursive=True)
        (raylet,) = [p for p in family if process_name(p) == "raylet"]
        self.orphans += [p for p in family if p is not raylet]
        raylet.kill()
        self.nodes.remove(node)
        self.orphans.append(psutil.Process(node.pid))
        wait_for_nodes(self, len(self.live()))   # until the cluster has marked it dead
        return raylet.pid

    def close(self) -> None:
        for proc in reversed(self.nodes):
            stop(proc)
        for p in self.orphans:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.ns.close()
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The folder both nodes see (sweep storage, logs): the module's, as its cluster is."""
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def cluster(shared):
    """A head node with no CPUs and one worker node with 2, for the module's tests (a start costs ~15 s of
    both cores, a stop ~30 s)."""
    logs = shared / "nodes"
    logs.mkdir()
    c = LoopbackCluster(logs)
    try:
        c.start_head()
        c.add_worker()
        yield c
    finally:
        c.close()


def wait_for_nodes(c: LoopbackCluster, n: int, timeout: float = 120) -> list[dict]:
    """The cluster's live nodes once there are `n` of them."""
    deadline = time.time() + timeout
    while True:
        assert all(p.poll() is None for p in c.nodes), "a `ray start` exited; see its log under tmp_path/nodes"
        out = subprocess.run(c.ns.argv(sys.executable, "-c", NODES), env=c.env, capture_output=True, text=True)
        if out.returncode == 0:
            nodes = [node for node in json.loads(out.stdout.strip().splitlines()[-1]) if node["alive"]]
            if len(nodes) == n:
                return nodes
        assert time.time() < deadline, f"cluster did not reach {n} nodes: {out.stderr[-2000:]}"
        time.sleep(2)


def in_namespace(c: LoopbackCluster, code: str, timeout: float = 300) -> dict:
    """Run Python `code` in the namespace (where the servers are); it prints one JSON line, returned."""
    out = subprocess.run(c.ns.argv(sys.executable, "-c", code), cwd=ROOT, env=c.env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_until(c: LoopbackCluster, check: str, procs, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while subprocess.run(c.ns.argv(*check.split()), env=c.env, capture_output=True).returncode != 0:
        assert all(p.poll() is None for p in procs), f"{what} exited; see its log under tmp_path/servers"
        assert time.time() < deadline, f"{what} did not come up in {timeout:.0f} s"
        time.sleep(1)


@pytest.fixture(scope="module")
def tracking_server(cluster, shared):
    """PostgreSQL and an MLflow tracking server on it, both on 127.0.0.1 in the cluster's namespace:
    (tracking URI, the folder the server keeps artifacts in)."""
    ns, env = cluster.ns, cluster.env
    assert (PG_BIN / "postgres").is_file(), f"no PostgreSQL server at {PG_BIN}: install Debian's postgresql-15"
    # postgres refuses to run as root: its folder belongs to the postgres user; short path (its socket)
    home = Path(tempfile.mkdtemp(prefix="sparta-pg-", dir="/tmp"))
    shutil.chown(home, "postgres")
    logs = shared / "servers"
    logs.mkdir()
    artifacts = shared / "mlflow-server-artifacts"
    as_postgres = ["runuser", "-u", "postgres", "--"]
    procs = []
    try:
        subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(home / "data"), "-A", "trust", "-U", "postgres",
                        "--no-sync"], check=True, capture_output=True)
        procs.append(subprocess.Popen(
            ns.argv(*as_postgres, str(PG_BIN / "postgres"), "-D", str(home / "data"), "-k", str(home),
                    "-h", "127.0.0.1", "-p", str(PG_PORT), "-c", "fsync=off"),
            stdout=open(logs / "postgres.log", "w"), stderr=subprocess.STDOUT))
        wait_until(cluster, f"{PG_BIN / 'pg_isready'} -h 127.0.0.1 -p {PG_PORT}", procs, "postgres")
        subprocess.run(ns.argv("psql", "-h", "127.0.0.1", "-p", str(PG_PORT), "-U", "postgres", "-c",
                               "CREATE DATABASE mlflow"), check=True, capture_output=True)
        procs.append(subprocess.Popen(
            ns.argv(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(MLFLOW_PORT),
                    "--workers", "1", "--backend-store-uri",
                    f"postgresql+psycopg2://postgres@127.0.0.1:{PG_PORT}/mlflow",
                    "--serve-artifacts", "--artifacts-destination", str(artifacts)),
            cwd=shared, env=env, stdout=open(logs / "mlflow.log", "w"), stderr=subprocess.STDOUT))
        wait_until(cluster, f"curl -sf http://127.0.0.1:{MLFLOW_PORT}/health", procs, "the MLflow server")
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
                "steps": [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")],
                "adapter": sorted(f.path for f in client.list_artifacts(r.info.run_id, "adapter"))} for r in trials],
    "parent": {"status": parent.info.status, "trials": parent.data.metrics.get("trials"), "id": parent.info.run_id},
    "champion": {"version": champion.version, "run_id": champion.run_id, "source": champion.source},
    "loaded_params": sum(p.numel() for p in model.parameters()),
}))
"""

ADDRESS = f"http://127.0.0.1:{DASHBOARD}"


def sparta(c: LoopbackCluster, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(c.ns.argv(sys.executable, "-m", "pipelines.cli", "sweep", *args), cwd=ROOT, env=c.env,
                          capture_output=True, text=True, timeout=timeout)


def job_of(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stderr
    return re.search(r"as Ray Job (\S+)", out.stdout).group(1)


def wait_for_job(c: LoopbackCluster, job: str, tmp_path: Path) -> str:
    """Until the job has succeeded; its log (also kept under tmp_path)."""
    done = sparta(c, "status", job, "--address", ADDRESS, "--wait", timeout=900)
    logs = sparta(c, "logs", job, "--address", ADDRESS).stdout
    (tmp_path / f"job-{job}.log").write_text(logs)
    assert (done.returncode, done.stdout.strip()) == (0, "SUCCEEDED"), \
        f"{logs[-3000:]}\n(all of it: {tmp_path}/job-{job}.log)"
    return logs


# Faults land between two checkpoints: trials long enough for ten of them (each trial ~1 min on 2 cores)
FAULT_STEPS, FAULT_EVERY = 40, 4
EVERY_STEP = list(range(FAULT_EVERY, FAULT_STEPS + 1, FAULT_EVERY))


def spec_file(tmp_path, experiment: str) -> Path:
    spec = yaml.safe_load(TINY.read_text())
    spec.update(experiment=experiment, seeds=[0], max_concurrent=2)   # lora and cla side by side
    spec["train"].update(steps=FAULT_STEPS, eval_every=FAULT_EVERY)
    path = tmp_path / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def checkpoints(storage: Path, experiment: str) -> dict[str, dict[str, int]]:
    """Per trial (its Ray Train run folder), its checkpoint folders in the shared storage and their steps."""
    found: dict[str, dict[str, int]] = {}
    for state in storage.glob(f"{experiment}/*/trials/trial-*/checkpoint_*/trainer_state.json"):
        try:
            found.setdefault(state.parents[1].name, {})[state.parent.name] = json.loads(state.read_text())["step"]
        except (OSError, ValueError):   # being written
            continue
    return found


def recorded_checkpoints(storage: Path, experiment: str) -> dict[str, str | None]:
    """Per trial, the checkpoint folder Ray Train last recorded as the run's latest: what a restarted trial
    resumes from. Read from Ray Train's own snapshot beside the checkpoints (a Ray 2.60 file: if its name
    or fields change, this fails loudly). A checkpoint can be on disk before it is recorded there, and a
    fault in between resumes from the one before."""
    found: dict[str, str | None] = {}
    for snapshot in storage.glob(f"{experiment}/*/trials/trial-*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):   # being written
            continue
        found[snapshot.parent.name] = latest.get("checkpoint_dir_name")
    return found


def wait_for_checkpoints(c: LoopbackCluster, job: str, storage: Path, experiment: str, timeout: float = 600) -> None:
    """Until Ray Train has recorded a checkpoint of both trials, and neither its last."""
    deadline = time.time() + timeout
    while not ((got := recorded_checkpoints(storage, experiment)) and len(got) == 2 and all(got.values())):
        assert time.time() < deadline, sparta(c, "logs", job, "--address", ADDRESS).stdout[-3000:]
        time.sleep(0.5)
    steps = checkpoints(storage, experiment)
    assert all(max(v.values()) < FAULT_STEPS for v in steps.values()), f"a trial ended before the fault: {steps}"


def assert_resumed_from_last_checkpoint(before: dict, recorded: dict, after: dict) -> None:
    """Each trial's checkpoints made after the fault go on from the last checkpoint Ray Train had recorded
    before it (`recorded`, read once the fault had stopped everything), to the end, none skipped. A
    restart from scratch would make step FAULT_EVERY's again."""
    assert sorted(after) == sorted(before) == sorted(recorded)
    for trial, made in after.items():
        resumed_from = before[trial][recorded[trial]]
        new = sorted(step for name, step in made.items() if name not in before[trial])
        assert resumed_from >= FAULT_EVERY, (trial, before[trial])
        assert new == list(range(resumed_from + FAULT_EVERY, FAULT_STEPS + 1, FAULT_EVERY)), \
            (trial, before, recorded, new)


def test_a_sweep_on_a_two_node_cluster_survives_losing_its_worker_node(cluster, tracking_server, shared, tmp_path):
    """Submitted with `sparta sweep run --address`, tracked by the MLflow server; mid-sweep the worker
    node's raylet is killed and a node started again: every trial finishes once, from its last checkpoint."""
    uri, server_artifacts = tracking_server
    nodes = wait_for_nodes(cluster, 2)
    assert {n["ip"] for n in nodes} == {"127.0.0.1"} and sorted(n["head"] for n in nodes) == [False, True]
    lost_id = next(n["id"] for n in nodes if not n["head"])
    storage = shared / "sweeps"   # both nodes see it (NFS on a cluster)

    job = job_of(sparta(cluster, "run", str(spec_file(tmp_path, "sweep-cluster")), "--address", ADDRESS,
                        "--tracking-uri", uri, "--storage", str(storage)))
    early = sparta(cluster, "status", job, "--address", ADDRESS).stdout.strip()
    assert early in ("PENDING", "RUNNING"), sparta(cluster, "logs", job, "--address", ADDRESS).stdout[-3000:]
    wait_for_checkpoints(cluster, job, storage, "sweep-cluster")
    (worker,) = cluster.live()[1:]
    cluster.kill_raylet(worker)   # returns once the cluster has marked the node dead
    before, recorded = checkpoints(storage, "sweep-cluster"), recorded_checkpoints(storage, "sweep-cluster")
    cluster.add_worker()
    new_id = next(n["id"] for n in wait_for_nodes(cluster, 2) if not n["head"])
    assert new_id != lost_id

    logs = wait_for_job(cluster, job, tmp_path)
    assert "registered models:/" in logs and "sweep 'sweep-cluster' done" in logs
    # everything read back through the server (the test process is outside the namespace)
    name = "sparta-minilm-l6-movie-reviews-binary"
    got = in_namespace(cluster, READ_BACK.replace("sys.argv[1], sys.argv[2]", f"{uri!r}, {name!r}"))
    trials = got["trials"]
    # every trial once: one child run each, FINISHED, under the parent run
    assert sorted(t["method"] for t in trials) == ["cla", "lora"]
    assert all(t["status"] == "FINISHED" and "final/test_accuracy" in t["metrics"] for t in trials)
    assert got["parent"]["status"] == "FINISHED" and got["parent"]["trials"] == 2
    # Tune restarted each trial (its trainable died with the node) and Ray Train went on from its last checkpoint ...
    assert_resumed_from_last_checkpoint(before, recorded, checkpoints(storage, "sweep-cluster"))
    for t in trials:
        # ... every evaluation in MLflow once (one in flight when the node died comes from the checkpoint) ...
        assert t["steps"] == EVERY_STEP, t
        # ... and each trial finished on the new node (the head holds no CPUs: trials never ran there)
        assert t["node"] == new_id
    # artifacts went over HTTP into the server's own folder, and nowhere else
    for t in trials:
        assert t["artifact_uri"].startswith("mlflow-artifacts:/")
        assert "adapter/adapter_model.safetensors" in t["adapter"]
    assert len(list(server_artifacts.rglob("adapter_model.safetensors"))) >= 3   # 2 trials + the registered model
    assert not list(shared.rglob("mlflow.db")) and not list(tmp_path.rglob("mlflow.db"))
    assert not (ROOT / "mlruns" / "artifacts" / "sweep-cluster").exists()
    # the registry resolves through the server: the champion alias, its model downloaded and loaded
    assert got["champion"]["version"] == "1" and got["loaded_params"] > 20_000_000


TRIAL_RUNS = """
import json
from mlflow import MlflowClient
client = MlflowClient(%r)
exp = client.get_experiment_by_name(%r)
runs = client.search_runs([exp.experiment_id], "tags.`sparta.role` = 'trial'")
parents = client.search_runs([exp.experiment_id], "tags.`sparta.role` = 'sweep'")
print(json.dumps({
    "trials": [{"key": r.data.tags["trial_key"], "status": r.info.status,
                "steps": [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")]} for r in runs],
    "parents": [{"status": p.info.status, "trials": p.data.metrics.get("trials")} for p in parents]}))
"""


def test_a_driver_killed_mid_sweep_resumes_as_a_ray_job(cluster, tracking_server, shared, tmp_path):
    uri, _ = tracking_server
    storage = shared / "sweeps"
    job = job_of(sparta(cluster, "run", str(spec_file(tmp_path, "sweep-driver-lost")), "--address", ADDRESS,
                        "--tracking-uri", uri, "--storage", str(storage)))
    wait_for_checkpoints(cluster, job, storage, "sweep-driver-lost")
    driver = in_namespace(cluster, "import json; from ray.job_submission import JobSubmissionClient; "
                                   f"print(json.dumps(JobSubmissionClient({ADDRESS!r}).get_job_info({job!r}).driver_info.pid))")
    os.kill(int(driver), signal.SIGKILL)   # the driver process (same PID namespace), as a lost head process
    assert sparta(cluster, "status", job, "--address", ADDRESS, "--wait").stdout.strip() == "FAILED"
    before, recorded = checkpoints(storage, "sweep-driver-lost"), recorded_checkpoints(storage, "sweep-driver-lost")

    # the state lies in the shared storage; the tracking URI is the one the sweep recorded there
    resumed = job_of(sparta(cluster, "resume", "sweep-driver-lost", "--address", ADDRESS, "--storage", str(storage)))
    assert "sweep 'sweep-driver-lost' done" in wait_for_job(cluster, resumed, tmp_path)
    got = in_namespace(cluster, TRIAL_RUNS % (uri, "sweep-driver-lost"))
    assert sorted(t["status"] for t in got["trials"]) == ["FINISHED", "FINISHED"], got
    assert len({t["key"] for t in got["trials"]}) == 2
    assert got["parents"] == [{"status": "FINISHED", "trials": 2}]   # the sweep's one parent run, finished
    # each trial went on from its last checkpoint, and MLflow has every evaluation once (those before the
    # kill from the checkpoint's record of the run)
    assert_resumed_from_last_checkpoint(before, recorded, checkpoints(storage, "sweep-driver-lost"))
    assert [t["steps"] for t in got["trials"]] == [EVERY_STEP, EVERY_STEP]


# -- serving: a replica on the worker node fetches its adapter through the MLflow server ---------------
REGISTER = """
import json, torch
from adapters import AdapterConfig
from pipelines.sweeps import tracking
from tests.helpers import trained_adapter
from workers.data.assets import load_model
overrides = {"max_position_embeddings": 256}
model, _ = load_model("random:llama-tiny", task="causal_lm", dtype=torch.float32, **overrides)
folder = trained_adapter(model.eval(), AdapterConfig(method="cla", rank=4, seed=1), 1, scale=0.5).save(%r)
params = {"model": "random:llama-tiny", "dataset": "movie-reviews", "method": "cla", "seed": 0, "lr": 1e-3,
          "rank": 4, "trial_key": "cla-s0", "task": "causal_lm", "model_overrides": overrides}
final = {"step": 4, "val_accuracy": 0.7, "test_accuracy": 0.6, "val_loss": 0.5, "metric": "accuracy"}
tracker = tracking.SweepTracker("serve-cluster", %r)
with tracker:
    tracker.start(None, {"models": ["random:llama-tiny"]})
    tracker.log_trial(params, [final], final, folder)
    [reg] = tracker.finish().registered
print(json.dumps({"name": reg.name, "version": reg.version, "folder": str(folder)}))
"""

ASK = """
import json, httpx
base = "http://127.0.0.1:%d"
models = httpx.get(base + "/v1/models", timeout=60).json()
r = httpx.post(base + "/v1/completions", json={"model": "cla", "prompt": "hello there", "max_tokens": 4,
                                               "temperature": 0}, timeout=120)
print(json.dumps({"models": [m["id"] for m in models["data"]], "status": r.status_code, "body": r.json()}))
"""


def test_a_replica_on_the_worker_node_downloads_its_adapter_through_the_server(cluster, tracking_server, shared,
                                                                               tmp_path):
    uri, _ = tracking_server
    reg = in_namespace(cluster, REGISTER % (str(tmp_path / "trained"), uri))
    port = 8000
    spec = {"model": "random:llama-tiny", "model_overrides": {"max_position_embeddings": 256}, "tracking_uri": uri,
            "adapters": [{"uri": f"models:/{reg['name']}@champion", "name": "cla"}], "dtype": "float32",
            "device": "cpu", "max_context": 256, "max_new_tokens": 8, "replicas": 1, "cpus_per_replica": 1,
            "host": "127.0.0.1", "port": port}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(spec))
    # the deploying process: its own cache (a home of its own), none passed on to the replica
    env = {k: v for k, v in cluster.env.items() if k != "SPARTA_CACHE"}
    env.update(HOME=str(tmp_path / "deployer-home"), MLFLOW_TRACKING_URI=uri)

    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(cluster.ns.argv(sys.executable, "-m", "pipelines.cli", "serve", *args,
                                              "--address", f"127.0.0.1:{GCS}"),
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    deployed = serve("deploy", str(path))
    try:
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        got = in_namespace(cluster, ASK % port)
        assert "cla" in got["models"], got
        assert got["status"] == 200 and got["body"]["usage"]["completion_tokens"] > 0, got
    finally:
        serve("shutdown")
    # the replica (on the worker node: the head has no CPUs) fetched the pinned version into that node's cache
    (worker,) = cluster.live()[1:]
    fetched = list((cluster.node_cache[worker.pid] / "serve" / "artifacts").rglob("adapter_model.safetensors"))
    assert len(fetched) == 1, fetched
    assert fetched[0].read_bytes() == (Path(reg["folder"]) / "adapter_model.safetensors").read_bytes()
    assert not list((tmp_path / "deployer-home").rglob("serve/artifacts"))   # the deployer fetched no copy for it

"""A deployment that lives in a background `sparta serve run` process of its own (`sparta serve deploy`
without --address, `sparta bench serve`): started in a session of its own so that it outlives the
command, found again through a small state file, stopped by its PID.

    bg = Background.start(Path("examples/serve-tiny.yaml"), state=Path("/tmp/s.json"), log=Path("/tmp/s.log"))
    bg.url                      # once every replica is up
    bg.stop()                   # SIGTERM: `serve run` stops Serve and Ray itself

`scheduler=` runs the spec with `scheduler.kind` overridden (`sparta serve run --scheduler`); the spec file
itself is used where it is, so that its relative paths stay relative to its folder.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from pipelines.http import wait_until


def default_state_path() -> Path:
    from workers.data.assets import cache_dir

    return cache_dir() / "serve" / "local.json"


@dataclass
class LocalState:
    """What a background `sparta serve run` records once its replicas are up: its PID, URL and Ray."""

    pid: int
    url: str
    name: str
    gcs_address: str
    spec: str
    log: str = ""
    auth_mode: str = ""   # RAY_AUTH_MODE of that Ray (a local ray.init turns token auth on by default)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> "LocalState | None":
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def scheduler_kinds() -> tuple[str, ...]:
    """The spec's scheduler.kind choices (continuous, static)."""
    from typing import get_args

    from pipelines.serving.spec import SchedulerSpec

    return get_args(SchedulerSpec.model_fields["kind"].annotation)


def load_spec(path: str | Path, port: int | None = None, scheduler: str | None = None):
    """The serve spec as `sparta serve run PATH [--port] [--scheduler]` deploys it: validated again with
    `scheduler.kind` replaced (the section's other fields kept), since a spec may be valid for one kind only."""
    from pipelines.serving.spec import load_serve_spec

    spec = load_serve_spec(path, port=port)
    if scheduler is None or scheduler == spec.scheduler.kind:
        return spec
    return load_serve_spec(path, port=port, scheduler={**spec.scheduler.model_dump(), "kind": scheduler})


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def stop_pid(pid: int, timeout_s: float) -> bool:
    """SIGTERM `pid` and wait for it to exit (reaping it when it is our child); False if it outlived
    `timeout_s`."""
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(timeout_s)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


class DeploymentError(RuntimeError):
    """The background deployment exited or did not come up; the message ends with its log's tail."""


class Background:
    """A `sparta serve run` of a spec in a process (and session) of its own."""

    def __init__(self, proc: subprocess.Popen, state: LocalState, log: Path):
        self.proc, self.state, self.log = proc, state, log

    @property
    def url(self) -> str:
        return self.state.url

    @classmethod
    def start(cls, spec_path: Path, state: Path, log: Path, port: int | None = None,
              timeout_s: float = 600.0, scheduler: str | None = None) -> "Background":
        """Start it and return once its replicas are up (it writes `state` then); DeploymentError when it
        exits first or is not up after `timeout_s` (then it is stopped). `scheduler` overrides the spec's
        scheduler.kind."""
        argv = [sys.executable, "-m", "pipelines.cli", "serve", "run", str(Path(spec_path).resolve()),
                "--state", str(state)]
        if port is not None:
            argv += ["--port", str(port)]
        if scheduler is not None:
            argv += ["--scheduler", scheduler]
        log.parent.mkdir(parents=True, exist_ok=True)
        state.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=dict(os.environ, SPARTA_SERVE_LOG=str(log)))

        def up():
            st = LocalState.read(state)
            if st is not None and st.pid == proc.pid:
                return st
            if proc.poll() is not None:
                raise DeploymentError(f"the deployment failed (exit {proc.returncode}); the end of {log}:\n"
                                      + _tail(log))
            return None

        starting = cls(proc, LocalState(proc.pid, "", "", "", str(spec_path)), log)
        try:
            starting.state = wait_until(up, timeout_s, "the replicas")
        except TimeoutError:
            starting.stop()
            raise DeploymentError(f"the replicas were not up after {timeout_s:.0f} s (log: {log}); stopped it:\n"
                                  + _tail(log)) from None
        except BaseException:   # Ctrl-C or SIGTERM while waiting: leave nothing running
            starting.stop()
            raise
        return starting

    def stop(self, timeout_s: float = 90.0, leftovers_s: float = 15.0) -> None:
        """SIGTERM it (`serve run` stops Serve and Ray itself) and wait; SIGKILL its session after
        `timeout_s`. Then no process it started may outlive it: a `serve run` stopped before its own
        SIGTERM handler is in place (while it deploys) exits at once, and the Ray processes it started
        (the HTTP proxy holding the port among them) would otherwise linger; whatever is left of them after
        `leftovers_s` is killed (psutil checks each is still the process it was, not a reused PID)."""
        descendants = _descendants(self.proc.pid) if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _killpg(self.proc.pid)   # the session this process started
                self.proc.wait()
        _, alive = psutil.wait_procs(descendants, timeout=leftovers_s)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

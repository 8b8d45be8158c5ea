"""The small modules every pipeline shares: the HTTP client and wait loop, tables, background processes."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from pipelines import tables
from pipelines.http import EndpointError, request_json, wait_until
from pipelines.serving.local import pid_alive, stop_pid
from tests.helpers import free_port, markdown_rows


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, kind: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/ok":
            self._send(200, json.dumps({"auth": self.headers.get("Authorization")}).encode())
        elif self.path == "/openai-error":
            self._send(404, json.dumps({"error": {"message": "model 'x' does not exist"}}).encode())
        else:
            self._send(500, b"plain failure", "text/plain")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._send(200, json.dumps({"echo": body}).encode())


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_request_json_gets_posts_and_names_the_servers_error(server):
    assert request_json(server + "/ok", api_key="k") == {"auth": "Bearer k"}
    assert request_json(server + "/post", {"a": [1, 2]}) == {"echo": {"a": [1, 2]}}
    with pytest.raises(EndpointError) as e:
        request_json(server + "/openai-error")
    assert (e.value.status, e.value.message) == (404, "model 'x' does not exist")
    with pytest.raises(EndpointError) as e:
        request_json(server + "/other")
    assert e.value.status == 500 and "plain failure" in str(e.value)
    with pytest.raises(EndpointError) as e:   # nothing listens there
        request_json(f"http://127.0.0.1:{free_port()}/ok", timeout=2)
    assert e.value.status == 0


def test_wait_until_returns_the_first_truthy_value_or_names_what_timed_out():
    calls = []
    assert wait_until(lambda: calls.append(1) or (len(calls) >= 3 and "ready"), 5, "x", interval_s=0.01) == "ready"
    assert len(calls) == 3
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="the replicas: not ready after 0 s"):
        wait_until(lambda: None, 0.2, "the replicas", interval_s=0.05)
    assert time.monotonic() - t0 < 2


def test_tables_escape_pipes_and_align_text_left_numbers_right():
    df = pd.DataFrame({"config": ["a|b", "c"], "accuracy": ["0.50", "1.00"]})
    md = tables.markdown(df)
    assert markdown_rows(md) == [["config", "accuracy"], ["a\\|b", "0.50"], ["c", "1.00"]]
    assert md.splitlines()[1].replace(" ", "").startswith("|:-") and md.splitlines()[1].rstrip().endswith(":|")
    text = tables.text(df).splitlines()
    assert text[0].split() == ["config", "accuracy"] and text[2].startswith("a|b") and text[3].endswith("1.00")


def test_pid_alive_and_stop_pid_on_a_real_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(proc.pid)
        assert stop_pid(proc.pid, 10)
        assert not pid_alive(proc.pid) and proc.poll() is not None
    finally:
        proc.kill()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_until(lambda: not pid_alive(zombie.pid), 10, "the child to exit", 0.05)   # exited, not yet reaped
    assert zombie.poll() == 0


def test_progress_in_a_log_is_a_line_per_step():
    """Without a terminal (a log, a pipe, nohup) a rich bar shows nothing: each new message is a line."""
    import io

    from rich.console import Console

    from pipelines.progress import bar

    buffer = io.StringIO()
    with bar(Console(file=buffer, width=120), unit="phases") as update:
        update("deploying", 0, 3)
        update("deploying", 0, 3)
        update("rate 0.1, art off", 1, 3)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].endswith("deploying (0/3 phases)") and "rate 0.1, art off (1/3 phases)" in lines[1]

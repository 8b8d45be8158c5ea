"""A replica's metrics, logged every `interval_s` to the deployment's MLflow run (created by the driver,
pipelines.serving.deploy). Plain Python: the replica feeds it from its request hooks, tests can drive it directly.

    reporter = MetricsReporter(tracking_uri, run_id, interval_s=30, replica_id="abc").start()
    reporter.request(200); reporter.completion(tokens=32, seconds=1.4, skipped=0.12)
    reporter.stop()                      # a last report, then the thread ends

Keys are `<metric>/<replica id>` (MLflow's UI groups them by metric), one point per report (step = report
number). Counts are totals since the replica started, so a report that fails (a locked sqlite store, a
server away) is made good by the next one; interval statistics (tokens/s, latency percentiles, skipped
fraction) cover the time since the last report that got through.
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np

log = logging.getLogger(__name__)


class MetricsReporter:
    def __init__(self, tracking_uri: str, run_id: str, interval_s: float, replica_id: str):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.tracking_uri, self.run_id, self.interval_s, self.replica_id = tracking_uri, run_id, interval_s, replica_id
        self.totals = {"requests": 0, "errors": 0, "output_tokens": 0}
        self._window: list[tuple] = []   # (tokens, seconds, skipped, ttft or None, tpot or None) per completion
        self._since = time.monotonic()
        self._step = 0
        self._lock = threading.RLock()   # report() holds it around snapshot()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None

    # -- fed by the replica (its event loop; cheap) ------------------------------------------------
    def request(self, status: int) -> None:
        with self._lock:
            self.totals["requests"] += 1
            self.totals["errors"] += status >= 400

    def completion(self, tokens: int, seconds: float, skipped: float, ttft: float | None = None,
                   tpot: float | None = None) -> None:
        with self._lock:
            self.totals["output_tokens"] += tokens
            self._window.append((tokens, seconds, skipped, ttft, tpot))

    # -- reporting ---------------------------------------------------------------------------------
    def start(self) -> MetricsReporter:
        # A thread, not an asyncio task: MLflow's client blocks, and Serve builds replicas outside their loop.
        self._thread = threading.Thread(target=self._loop, name="sparta-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.report()
        self.report()   # what came in since the last report

    def snapshot(self) -> dict[str, float]:
        """The metrics of a report now (without resetting the interval)."""
        with self._lock:
            out = {k: float(v) for k, v in self.totals.items()}
            window, elapsed = list(self._window), time.monotonic() - self._since
        tokens = sum(w[0] for w in window)
        out["output_tokens_per_s"] = tokens / elapsed if elapsed > 0 else 0.0
        out["requests_per_s"] = len(window) / elapsed if elapsed > 0 else 0.0
        if window:   # latency and skipped fraction only mean something over some requests
            seconds = np.array([w[1] for w in window])
            out["latency_p50_s"] = float(np.percentile(seconds, 50))
            out["latency_p99_s"] = float(np.percentile(seconds, 99))
            out["skipped_fraction"] = float(np.mean([w[2] for w in window]))
            for name, i in (("ttft", 3), ("tpot", 4)):
                values = [w[i] for w in window if w[i] is not None]
                if values:
                    out[f"{name}_p50_s"] = float(np.percentile(values, 50))
                    out[f"{name}_p99_s"] = float(np.percentile(values, 99))
        return out

    def report(self) -> bool:
        """Log one point of every metric; False (and a warning) when the store refused it."""
        from mlflow.entities import Metric

        with self._lock:
            values, n = self.snapshot(), len(self._window)
        now = int(time.time() * 1000)
        metrics = [Metric(f"{k}/{self.replica_id}", v, now, self._step) for k, v in values.items()]
        try:
            if self._client is None:
                from mlflow import MlflowClient

                self._client = MlflowClient(self.tracking_uri)
            self._client.log_batch(self.run_id, metrics=metrics)
        except Exception as e:   # never take the replica down for its metrics
            log.warning("replica %s: metrics not logged to run %s: %s", self.replica_id, self.run_id, e)
            return False
        with self._lock:
            del self._window[:n]
            self._since = time.monotonic()
        self._step += 1
        return True

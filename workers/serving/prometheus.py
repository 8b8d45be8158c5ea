"""A replica's `/metrics` in Prometheus' text format (prometheus_client, a registry of its own per replica).

Counters and histograms are fed per request by the replica; the engine's state (running and queued
requests, KV pool use, ART's block totals) is read at scrape time. Every series carries the served
`model` and the `replica` id: behind Serve's proxy a scrape reaches one replica, so scrape each replica
(or use Ray's metrics export, which gathers the replicas' Ray Serve metrics) for a deployment-wide view.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (the response's media type)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)


class EngineState:
    """Reads the engine's load (workers.serving.continuous.ContinuousEngine.load keys) when scraped."""

    def __init__(self, read: Callable[[], dict], labels: dict[str, str]):
        self.read, self.labels = read, labels

    def describe(self):
        return []

    def collect(self):
        state = self.read()
        names, values = list(self.labels), list(self.labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        yield gauge("sparta_requests_running", "Requests holding KV slots (prefilling or decoding).",
                    state.get("running_requests", 0))
        yield gauge("sparta_requests_queued", "Requests waiting for a KV slot.", state.get("queued_requests", 0))
        if "kv_slots" in state:
            yield gauge("sparta_kv_slots", "KV pool slots (sequences decoded at once).", state["kv_slots"])
            yield gauge("sparta_kv_slots_used", "KV pool slots held by sequences.", state["kv_slots_used"])
            yield gauge("sparta_kv_cache_usage_ratio", "Fraction of the KV pool's positions holding keys.",
                        state["kv_used_tokens"] / max(1, state["kv_cache_tokens"]))
            yield counter("sparta_engine_steps", "Engine steps (one packed forward each).", state["steps"])
            yield counter("sparta_prefill_tokens", "Prompt tokens prefilled.", state["prefill_tokens"])
        visited, candidates = state.get("visited_blocks", 0), state.get("candidate_blocks", 0)
        yield counter("sparta_art_visited_blocks", "KV blocks decode attention read (layers x KV heads x steps).",
                      visited)
        yield counter("sparta_art_candidate_blocks", "KV blocks decode attention could have read.", candidates)
        yield gauge("sparta_art_skipped_fraction", "Fraction of candidate KV blocks ART skipped since the start.",
                    1.0 - visited / candidates if candidates else 0.0)


class ServingMetrics:
    """The replica's Prometheus registry: `request(...)` after every answered request, `render()` per scrape."""

    def __init__(self, model: str, replica: str, engine_state: Callable[[], dict]):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model": model, "replica": replica}
        self.labels = labels
        keys = ("model", "replica", "endpoint")
        r = self.registry
        self.requests = Counter("sparta_requests", "Requests answered, by endpoint and HTTP status.",
                                (*keys, "status"), registry=r)
        self.prompt_tokens = Counter("sparta_prompt_tokens", "Prompt tokens of answered requests.", keys, registry=r)
        self.output_tokens = Counter("sparta_output_tokens", "Completion tokens generated.", keys, registry=r)
        self.ttft = Histogram("sparta_time_to_first_token_seconds", "Arrival to first token.", keys,
                              buckets=LATENCY_S, registry=r)
        self.tpot = Histogram("sparta_time_per_output_token_seconds", "Time per output token after the first.",
                              keys, buckets=TOKEN_S, registry=r)
        self.e2e = Histogram("sparta_e2e_request_latency_seconds", "Arrival to last token.", keys,
                             buckets=LATENCY_S, registry=r)
        r.register(EngineState(engine_state, labels))

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(**self.labels, endpoint=endpoint, status=str(status)).inc()

    def completion(self, endpoint: str, done) -> None:
        """A finished workers.serving.engine.Completion."""
        tags = dict(self.labels, endpoint=endpoint)
        self.prompt_tokens.labels(**tags).inc(done.prompt_tokens)
        self.output_tokens.labels(**tags).inc(done.completion_tokens)
        if done.ttft_s is not None:
            self.ttft.labels(**tags).observe(done.ttft_s)
        if done.tpot_s is not None:
            self.tpot.labels(**tags).observe(done.tpot_s)
        self.e2e.labels(**tags).observe(done.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

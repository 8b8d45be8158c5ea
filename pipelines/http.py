"""The one HTTP client of the pipelines (httpx) and the one wait-until-ready loop.

    card = request_json("http://127.0.0.1:8000/v1/models")           # EndpointError on failure
    wait_until(lambda: state.exists(), timeout_s=60, what="the state file")
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

import httpx

T = TypeVar("T")


class EndpointError(OSError):
    """A request that failed: `status` is the HTTP status (0 when no answer came), `message` the server's
    own error message when it sent an OpenAI-style {"error": {"message": ...}}."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(f"{url}: HTTP {status}: {message}" if status else f"{url}: {message}")
        self.url, self.status, self.message = url, status, message


def request_json(url: str, body: dict | None = None, api_key: str | None = None, timeout: float = 30.0) -> dict:
    """GET `url` (or POST `body` as JSON) and return the JSON answer."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = (httpx.get(url, headers=headers, timeout=timeout) if body is None else
             httpx.post(url, json=body, headers=headers, timeout=timeout))
    except httpx.HTTPError as e:
        raise EndpointError(url, 0, str(e) or type(e).__name__) from None
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:500] or r.reason_phrase
        raise EndpointError(url, r.status_code, message)
    try:
        return r.json()
    except ValueError:
        raise EndpointError(url, r.status_code, f"not JSON: {r.text[:200]!r}") from None


def wait_until(probe: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.5) -> T:
    """Call `probe` every `interval_s` until it returns something truthy, and return that; TimeoutError
    naming `what` after `timeout_s`. Exceptions from `probe` propagate (a probe that tolerates failures
    catches them itself)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s")
        time.sleep(interval_s)


def wait_healthy(url: str, timeout_s: float = 60.0, api_key: str | None = None) -> dict:
    """Wait until `url`/healthz answers 200; its JSON."""
    def probe():
        try:
            return request_json(url + "/healthz", api_key=api_key, timeout=5)
        except EndpointError:
            return None

    return wait_until(probe, timeout_s, f"{url}/healthz")

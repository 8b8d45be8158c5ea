"""What several test modules share: the repository root, a free loopback port, the CLI as a subprocess."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sparta(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pipelines.cli ARGS` from the repository root, loopback only and offline."""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               **(env or {}))
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def markdown_rows(text: str) -> list[list[str]]:
    """The rows of the markdown tables in `text` (header rows included, rule lines not), cells stripped."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and not set(line) <= set("|:- "):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line[1:-1])])   # "\|" is a pipe inside a cell
    return rows


def trained_adapter(model, config, seed: int = 1, scale: float = 0.3):
    """`adapters.apply(model, config)`, as if trained: every tensor it trains (and the task head) moved by
    seeded random values (B = 0 at init would change nothing); a chained method gets a second segment, moved
    too, so that exports and servers must stack both. Returns the handle."""
    import torch

    import adapters

    handle = adapters.apply(model, config)
    g = torch.Generator().manual_seed(seed)
    for segment in range(2 if config.spec.chained else 1):
        if segment:
            handle.chain_step()
        with torch.no_grad():
            for p in handle.adapter_parameters() + handle.head_parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
    return handle

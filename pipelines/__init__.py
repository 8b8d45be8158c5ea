"""Orchestration and the user's surface: sweeps, serving, evaluation, benchmarks, the CLI."""
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]   # the checkout (or installed tree) sparta runs from

"""Orchestration and the user's surface: specs, sweeps, serving, evaluation, benchmarks, the CLI."""

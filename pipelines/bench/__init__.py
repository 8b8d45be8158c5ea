"""Benchmarks that measure side by side in one run and print ratios: train, decode, serve, overhead."""

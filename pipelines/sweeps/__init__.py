"""Sweeps: the spec, the Ray Tune x Ray Train driver, MLflow tracking, the summary table, the registry
hand-off, Ray Jobs."""

"""The Beyond-LoRA analyses of a sweep: measures per trial (adapters.analysis, workers.training.landscape) and the
report over trials (report.py)."""

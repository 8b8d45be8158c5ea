"""Code that runs inside Ray workers (training loop, serving replica, eval tasks) and the offline
assets they load. Importable and runnable without Ray."""

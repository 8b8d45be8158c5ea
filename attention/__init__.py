"""ART decoding, KV policies and kernels (pure PyTorch/Triton; no Ray, no MLflow). Built by the ART issue."""

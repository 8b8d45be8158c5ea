"""ART decoding (Attention Run-time Termination), KV policies and kernels: pure PyTorch/Triton, no Ray,
no MLflow.

    from attention import ARTConfig, decode_attention
    out, stats = decode_attention(q, k, v, ARTConfig(mode="certified", eps=1e-4))   # impl="auto"|"cpu"|...
"""
from attention.cache import new_cache
from attention.config import ARTConfig, parse_art
from attention.kernels.dispatch import decode_attention
from attention.hf import ARTSession, enable_art
from attention.reference import ARTStats, block_key_bounds

__all__ = ["ARTConfig", "ARTSession", "ARTStats", "block_key_bounds", "decode_attention", "enable_art", "new_cache", "parse_art"]

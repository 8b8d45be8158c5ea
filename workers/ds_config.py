"""What the training loop accepts in a DeepSpeed config. Kept apart from workers.train (which imports
DeepSpeed) so the sweep spec can check a config before anything starts."""
from __future__ import annotations

ZERO_STAGES = (0, 1, 2)


def check_deepspeed(ds: dict, batch_size: int, precision: str) -> None:
    """Raise ValueError (without a field prefix: callers add theirs) for what the loop cannot run."""
    if not isinstance(ds, dict):
        raise ValueError(f"must be a dict (a DeepSpeed config), got {type(ds).__name__}")
    if "optimizer" in ds:
        raise ValueError("drop the 'optimizer' section; the loop builds AdamW from the "
                         "adapter's parameter groups (per-group lr and weight decay), which a DeepSpeed "
                         "optimizer would ignore")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage {stage!r} is not supported; use 0, 1 or 2. Stage 3 "
                         "partitions every weight across workers, so chain steps (in-place merges), adapter "
                         "saving and generation would need gathered parameters, which this loop does not do; "
                         "an adapter's trained state is small enough that stages 1-2 already shard it")
    if ds.get("fp16", {}).get("enabled"):
        raise ValueError("fp16 is not offered; use precision='bf16'")
    bf16 = ds.get("bf16", {}).get("enabled")
    if bf16 is not None and bool(bf16) != (precision == "bf16"):
        raise ValueError(f"bf16.enabled={bf16} but precision={precision!r}; "
                         "set precision only")
    micro = ds.get("train_micro_batch_size_per_gpu")
    if micro is not None and micro != batch_size:
        raise ValueError(f"train_micro_batch_size_per_gpu={micro} but "
                         f"batch_size={batch_size}; set batch_size only")

"""The training loop's side of DeepSpeed: which configs it accepts (checked by the sweep spec before
anything starts, so importing this module imports neither torch nor DeepSpeed), the config its engine
gets, and chain steps made right under DeepSpeed's optimizer wrappers."""
from __future__ import annotations

import copy

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
    if bf16 is not None and precision == "auto":
        raise ValueError(f"bf16.enabled={bf16} but precision='auto' (which sets bf16 per device); "
                         "leave bf16 out of the config, or set precision fp32 or bf16")
    if bf16 is not None and bool(bf16) != (precision == "bf16"):
        raise ValueError(f"bf16.enabled={bf16} but precision={precision!r}; "
                         "set precision only")
    micro = ds.get("train_micro_batch_size_per_gpu")
    if micro is not None and micro != batch_size:
        raise ValueError(f"train_micro_batch_size_per_gpu={micro} but "
                         f"batch_size={batch_size}; set batch_size only")


def engine_config(ds: dict, batch_size: int, precision: str) -> dict:
    """The DeepSpeed config the engine gets: `ds` with the loop's settings filled in."""
    ds = copy.deepcopy(ds)
    ds["train_micro_batch_size_per_gpu"] = batch_size
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.setdefault("zero_optimization", {"stage": 0})
    ds.setdefault("zero_allow_untested_optimizer", True)   # a torch AdamW: no 40-55 s op build
    ds.setdefault("steps_per_print", 2**31 - 1)            # the loop reports; DeepSpeed need not print
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    return ds


def chain_step(handle, engine) -> None:
    """`handle.chain_step` (an adapters.Adapter) made right under DeepSpeed's optimizer wrappers.

    The adapter merges s B_j A_j into W0, draws the next A_j and zeroes B in the model's own tensors,
    and drops the optimizer state keyed by those tensors. That is all a plain torch optimizer needs
    (ZeRO stage 0 in fp32). Every other wrapper steps separate fp32 master copies (ZeRO 1/2: one flat
    partition per parameter group; bf16 at stage 0: one copy per parameter) and copies them back over
    the model's tensors after each step, so the reset would be undone at the next step and the inner
    optimizer's state (keyed by the masters) would survive. Here the masters of the adapter's groups
    are refreshed from the model and their state is dropped; the head's groups keep theirs.
    `handle.param_groups` keeps adapter and head parameters in separate groups, which is what makes
    a flat per-group partition resettable on its own.
    """
    optimizer = engine.optimizer
    handle.chain_step(optimizer)
    adapter_ids = {id(p) for p in handle.adapter_parameters()}
    for master, model_copy in adapter_masters(optimizer, adapter_ids):
        master.data.copy_(model_copy.data)
        optimizer.optimizer.state.pop(master, None)


def adapter_masters(optimizer, adapter_ids: set[int]) -> list[tuple]:
    """(fp32 master, model tensor it mirrors) for the optimizer groups that hold adapter parameters."""
    import deepspeed
    import torch

    if isinstance(optimizer, torch.optim.Optimizer):   # steps the model's tensors themselves
        return []
    if hasattr(optimizer, "single_partition_of_fp32_groups"):      # ZeRO 1/2 (DeepSpeedZeroOptimizer)
        groups, masters = optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups
        copies = [parts[deepspeed.comm.get_rank(group=pg)] for parts, pg in
                  zip(optimizer.parallel_partitioned_bit16_groups, optimizer.real_dp_process_group)]
        pairs = [[(m, c)] for m, c in zip(masters, copies)]
    elif hasattr(optimizer, "fp32_groups_flat_partition"):          # BF16_Optimizer
        groups, masters = optimizer.bf16_groups, optimizer.fp32_groups_flat_partition
        copies = [parts[deepspeed.comm.get_rank(group=pg)] for parts, pg in
                  zip(optimizer.bf16_partitioned_groups, optimizer.real_dp_process_group)]
        pairs = [[(m, c)] for m, c in zip(masters, copies)]
    elif hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):   # FP16_UnfusedOptimizer
        groups = optimizer.fp16_groups
        pairs = [list(zip(m, c)) for m, c in zip(optimizer.fp32_groups, optimizer.fp16_groups)]
    else:
        raise NotImplementedError(f"chain steps under DeepSpeed's {type(optimizer).__name__} are not supported")
    out = []
    for params, group_pairs in zip(groups, pairs):
        held = [id(p) in adapter_ids for p in params]
        if any(held) and not all(held):
            raise RuntimeError("an optimizer group mixes adapter and other parameters; its flat fp32 state "
                               "cannot be reset for the adapter alone (build groups with handle.param_groups)")
        if any(held):
            out += group_pairs
    return out

"""The machine a worker runs on: its CPU's name, whether it does bfloat16 matmuls natively, and what the
`auto` dtype means there. bf16 pays on CUDA and on CPUs with AMX or AVX-512 BF16; on an AVX2-only CPU a
bf16 matmul runs ~8x slower than fp32 (torch 2.13), so `auto` is fp32 there."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
PRECISIONS = ("auto", "fp32", "bf16")   # the training loop's names for the same choice


def resolve_device(name: str = "auto") -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; other names unchanged."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_bf16_features() -> list[str]:
    """The CPU's native bf16 matmul features as torch sees them: "amx_bf16", "avx512_bf16" (or none)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {
        "amx_bf16": torch.cpu._is_amx_tile_supported(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported()}
    return [name for name in ("amx_bf16", "avx512_bf16") if caps.get(name)]


def native_bf16(device: str | torch.device = "cpu") -> bool:
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_bf16_features())


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> str:
    """"auto" -> "bfloat16" where `device` runs it natively, else "float32"; other names unchanged."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    if name != "auto":
        return name
    return "bfloat16" if native_bf16(device) else "float32"


def resolve_precision(name: str, device: str | torch.device = "cpu") -> str:
    """The training precision: "auto" -> "bf16" or "fp32" by the same rule as `resolve_dtype`."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; valid: {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    return "bf16" if native_bf16(device) else "fp32"


def why(device: str | torch.device = "cpu") -> str:
    """One line saying what `auto` picks here and why, for the console and MLflow."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"bfloat16 on {name}" if native_bf16(device) else f"float32 on {name} (no bf16 support)"
    features = cpu_bf16_features()
    if features:
        return f"bfloat16 on {cpu_name()} ({', '.join(features)})"
    return f"float32 on {cpu_name()} (no AMX or AVX-512 BF16: bf16 matmuls would be ~8x slower)"

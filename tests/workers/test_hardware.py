"""What `auto` means on this machine: bf16 only where the device runs bf16 matmuls natively."""
import pytest
import torch

from workers import hardware


def test_auto_dtype_follows_the_cpus_native_bf16():
    native = bool(hardware.cpu_bf16_features())
    assert hardware.resolve_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert hardware.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert hardware.why("cpu").startswith("bfloat16" if native else "float32")
    assert hardware.cpu_name() in hardware.why("cpu")


def test_cpu_features_are_torchs_own_report():
    caps = torch.cpu.get_capabilities()
    assert hardware.cpu_bf16_features() == [n for n in ("amx_bf16", "avx512_bf16") if caps.get(n)]


def test_explicit_choices_are_kept_and_bad_ones_name_the_valid():
    assert hardware.resolve_dtype("float32") == "float32" and hardware.resolve_dtype("bfloat16") == "bfloat16"
    assert hardware.resolve_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="'fp16'; valid: auto, float32, bfloat16"):
        hardware.resolve_dtype("fp16")
    with pytest.raises(ValueError, match="valid: auto, fp32, bf16"):
        hardware.resolve_precision("half")


def test_device_auto_is_cuda_only_with_a_gpu():
    assert hardware.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert hardware.resolve_device("cpu") == "cpu"

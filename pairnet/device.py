"""Device choice, the leaf every floor may import: which device trains or serves, the
autocast dtype for it, the CPU's feature flags, and the moves onto a device. Chosen once at
the edge (a stage, the serving model, the doctor) and passed down."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from pairnet.errors import PairnetError


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a config value on a device (None = full fp32).

    ``auto``: bf16 on GPUs that compute it natively (Ampere and later), else fp16 with a
    GradScaler (older GPUs only emulate bf16, without tensor cores); on the CPU, bf16 where the chip
    computes it natively (AVX512_BF16 or AMX), where bench/train_bench.py measured it faster; else fp32.
    """
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise PairnetError("amp 'fp16' needs a CUDA device; use 'bf16' or 'off' on the CPU")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if NATIVE_BF16_FLAGS & cpu_flags() else None


# /proc/cpuinfo flags of x86 chips whose bf16 dot products run in hardware, which oneDNN
# uses for bf16 convolutions and matmuls: AVX512_BF16 (Cooper Lake, Zen 4 and later) and
# AMX (Sapphire Rapids and later).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo text (read when not given; empty where
    there is none, as on macOS)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def enable_cuda_speedups() -> None:
    """cuDNN autotuning (batch shapes are fixed, so each convolution picks its fastest
    algorithm once) and TF32 for the fp32 matmuls and convolutions left outside autocast.
    Process-wide flags: set when training starts on CUDA, never at import."""
    torch.backends.cudnn.benchmark = True
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9 deprecates allow_tf32
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it counts that work (CUDA
    kernels run asynchronously: without it a timer measures only the launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; on CUDA through pinned memory without blocking the host."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PairnetError(f"device '{name}' asked for, but no CUDA device is available")
    return torch.device(name)

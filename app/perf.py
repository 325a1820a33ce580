"""The machine's matrix-product peak, measured: the MFU denominator and the precision choice."""

from __future__ import annotations

import time

import torch


def matmul_flops(dtype: torch.dtype, device: torch.device, *, size: int = 1024, seconds: float = 1.0) -> float:
    """Sustained FLOP/s of square `size` matrix products in `dtype`: the best burst of `seconds`.

    NOTE: a core that was idle can take a few hundred ms to run at full speed (measured on this VM:
    a 0.3 s burst right after 2 s of sleep once gave 200 GFLOP/s against 320), and a low peak
    inflates MFU (a default run once logged 100%); the later bursts of a longer window are warm.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def choose_precision(device: torch.device) -> str:
    """`bf16-mixed` where bf16 products are clearly faster than fp32 (AMX CPUs, GPUs), else `32-true`.

    Measured, not assumed: a CPU with AVX512-BF16 but no AMX runs bf16 products slower than fp32.
    """
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    fp32 = matmul_flops(torch.float32, device)
    bf16 = matmul_flops(torch.bfloat16, device)
    return "bf16-mixed" if bf16 > 1.2 * fp32 else "32-true"


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype matrix products run in under a Lightning precision string."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

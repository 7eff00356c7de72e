"""Small helpers shared by the kernel files (no kernels here)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"a fastross kernel got a {t.device.type} tensor without TRITON_INTERPRET=1: "
                "run on a CUDA device, or set TRITON_INTERPRET=1 before importing fastross.kernels"
            )


def row_block(width: int, target: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_W) for row-wise kernels: a whole row per tile, about `target` elements per program."""
    block_w = triton.next_power_of_2(width)
    return max(1, min(64, target // block_w)), block_w  # both powers of two


def elementwise_target() -> int:
    """Elements per program for memory-bound kernels: big tiles in the interpreter (fewer programs)."""
    return 1 << 14 if interpreting() else 1 << 12


def rows2d(t: torch.Tensor, width: int, name: str) -> torch.Tensor:
    """A (rows, width) view of t with unit column stride, without copying when t's rows are evenly strided.

    adaLN chunks (views into the projection's output) stay views: their row stride is passed to the kernel.
    """
    if t.shape[-1] != width:
        raise ValueError(f"{name}: last dimension {t.shape[-1]} != {width}")
    try:
        v = t.view(-1, width)
    except RuntimeError:
        v = t.reshape(-1, width)
    if v.stride(1) != 1:
        v = v.contiguous()
    return v


# The interpreter converts fp32 -> bf16 by truncation (round toward zero), whatever rounding is
# asked for; the GPU rounds to nearest even, as PyTorch does. Kernels cast through to_dtype so
# that both agree (and the bf16 tests measure the kernel's error, not the interpreter's).
INTERPRET = tl.constexpr(interpreting())


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """x (fp32) -> dtype, rounding to nearest even also in the interpreter."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            x = u.to(tl.float32, bitcast=True)
    return x.to(dtype)

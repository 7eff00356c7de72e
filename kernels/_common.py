"""Small helpers shared by the kernel files (no kernels here)."""

from __future__ import annotations

import math
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
    """(BLOCK_M, BLOCK_W) for row-wise kernels: a whole row per tile, about `target` elements per program.

    At most 64 rows on a GPU (registers); the interpreter's limit grows with its budget (64 at 2^14, 4096 at 2^20)."""
    block_w = triton.next_power_of_2(width)
    cap = target >> 8 if interpreting() else 64
    return max(1, min(cap, target // block_w)), block_w  # both powers of two


# The interpreter runs a program's block ops as numpy calls on whole tiles: its cost is per program and per op, far
# more than per element, so the fewer and bigger the programs the better (the tiny denoiser's step: ~1 program per
# kernel at 2^20 elements, against 16-32 at 2^14). The kernel tests lower the budget to 2^14
# (tests/kernels/conftest.py), so that their odd shapes cross tile edges in every direction, as on a GPU.
INTERPRET_ELEMENTS = "FASTROSS_INTERPRET_ELEMENTS"


def elementwise_target() -> int:
    """Elements per program for memory-bound kernels: big tiles in the interpreter (fewer programs)."""
    return int(os.environ.get(INTERPRET_ELEMENTS, 1 << 20)) if interpreting() else 1 << 12


def interpreter_matmul_tiles(m: int, n: int, k: int) -> dict:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M) for a matmul kernel under the interpreter, within elementwise_target():
    128 x 128 x 64 at 2^14 elements; at 2^20 the tiny denoiser's (2048, 64) @ (64, 256) is one program."""
    budget = elementwise_target()
    bn = max(16, min(triton.next_power_of_2(n), math.isqrt(budget)))
    bm = max(32, min(triton.next_power_of_2(m), budget // bn))  # >= 32: linear_epilogue's column-sum rows
    bk = max(16, min(triton.next_power_of_2(k), max(64, budget >> 12)))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1}


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

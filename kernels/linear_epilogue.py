"""A matmul with the denoiser's elementwise tails fused into its epilogue.

Design
------
C = A @ B (A (M, K), B (K, N) any strides: an nn.Linear weight is passed as its transpose
view), fp32 accumulation in a grouped-ordering tiled kernel, and one of four epilogues applied
to the accumulator tile while it is still in registers:

  "none"      o1 = C (+ bias)
  "bias_act"  o1 = h = C + bias (stored for backward), o2 = act(h)       fc1 forward
  "gate_res"  o1 = b = C + bias (stored for backward), o2 = res + gate*b  fc2 / attention
                                                                           proj forward
  "act_grad"  o1 = C * act'(h), o2 = act(h), h read from aux              fc2's input-gradient
                                                                           matmul in backward
act is tanh-GELU (DiT) or SiLU (MLP variant); act(h) is evaluated on h rounded to the storage
dtype, so forward and the recomputation in backward see the same numbers. `gate` is read
through its row stride (an adaLN chunk view). With `col_sums`, o1's column sums are written
as fp32 partials per row tile (the bias gradient, without another pass over o1).

Each epilogue saves at least one full pass over an (M, N) tensor compared with eager PyTorch
(matmul -> bias -> activation, or matmul -> mul -> add, each reading and writing memory).
Matmuls with nothing to fuse (weight gradients, plain input gradients, qkv) stay on cuBLAS.

`gate_backward` is the elementwise backward of "gate_res": d_b = dout * gate,
d_gate = dout * b, with the column sums of d_b (the bias gradient) as fp32 partials.

Plan at the 7B shapes (M = 46656, W = 1024, bf16; H100 790 TFLOP/s, 3 TB/s):
  fc1 (K = W, N = 4W)  2 M W 4W = 391 GFLOP: 495 us of tensor-core time; its epilogue writes
                       h and act (2 x 382 MB: 255 us if not overlapped) -> the epilogue is not
                       free; storing h only and recomputing act in backward is what it buys.
  fc2 (K = 4W, N = W)  391 GFLOP, 495 us; epilogue reads res, gate, writes b, out (4 x 95.6 MB).
  proj (K = N = W)      98 GFLOP, 124 us; same epilogue.
  act_grad (K = W, N = 4W) 391 GFLOP; epilogue reads h, writes dh, act (3 x 382 MB).
Tile configs are autotuned on the GPU (the interpreter, and FASTROSS_AUTOTUNE=0 for quick GPU
tests, get one config: CPU_AND_GPU.md);
bf16 dots run on tensor cores, fp32 dots are IEEE (exact reference path) and in the
interpreter bf16 operands are upcast before tl.dot (its bf16 dot is wrong).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import check_device, elementwise_target, interpreter_matmul_tiles, interpreting, row_block, to_dtype

EPILOGUES = {"none": 0, "bias_act": 1, "gate_res": 2, "act_grad": 3}
ACTS = {"gelu_tanh": 0, "silu": 1}


def _configs():
    """One config with FASTROSS_AUTOTUNE=0 (quick GPU tests); else five Hopper tiles for autotuning (BLOCK_M >= 32
    everywhere: the column-sum buffer assumes it). The interpreter bypasses the autotuner.

    Chosen by benchmarks/kernels/compile_report.py (ptxas -v for sm_90a, no device needed): none of these spills
    for the "none"/"bias_act"/"gate_res" epilogues in bf16 or fp32. The 128x256, 256x128 and 128x128/4-warp tiles
    of the earlier list spilled 88-5920 bytes there and are gone. The "act_grad" epilogue (h read in fp32, two
    outputs) spills in bf16 at every tile above 64 x 128 (8-24 bytes; fp32 24-72 at 128 x 128): `_prune` keeps it
    to the two small ones. FASTROSS_AUTOTUNE=0's 64 x 128 tile spills in no epilogue."""
    cfg = lambda bm, bn, bk, s, w: triton.Config(  # noqa: E731
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w
    )
    if os.environ.get("FASTROSS_AUTOTUNE", "1") == "0":
        return [cfg(64, 128, 64, 4, 8)]
    return [
        cfg(128, 128, 64, 3, 8),
        cfg(128, 128, 64, 4, 8),
        cfg(64, 256, 64, 3, 8),
        cfg(64, 128, 64, 4, 8),
        cfg(64, 64, 64, 4, 4),
    ]


ACT_GRAD_MAX_TILE = 64 * 128  # BLOCK_M * BLOCK_N above which the act_grad epilogue spills on sm_90a


def _prune(configs, named_args, **kwargs):
    """early_config_prune: the act_grad epilogue only gets tiles that do not spill (see _configs)."""
    if kwargs.get("EPILOGUE") == EPILOGUES["act_grad"]:
        return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= ACT_GRAD_MAX_TILE]
    return configs


@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == 0:  # tanh-GELU: 0.5 h (1 + tanh(u)) = h * sigmoid(2u), u = sqrt(2/pi) (h + 0.044715 h^3)
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        return h * tl.sigmoid(2.0 * u)
    else:  # SiLU
        return h * tl.sigmoid(h)


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    if ACT == 0:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        sg = tl.sigmoid(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
        return sg + h * 2.0 * sg * (1.0 - sg) * du
    else:
        sg = tl.sigmoid(h)
        return sg * (1.0 + h * (1.0 - sg))


# colsum partials are indexed by the M tile, whose size differs between configs: zeroed before each try
@triton.autotune(
    configs=_configs(),
    key=["M", "N", "K", "EPILOGUE", "ACT", "HAS_BIAS"],
    reset_to_zero=["colsum_ptr"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _linear_kernel(
    a_ptr,  # (M, K) left operand, strides (stride_am, stride_ak)
    b_ptr,  # (K, N) right operand, strides (stride_bk, stride_bn): a weight's transpose view
    bias_ptr,  # (N,) bias, unused unless HAS_BIAS
    aux_ptr,  # (M, N) residual ("gate_res") or pre-activation h ("act_grad"), row stride stride_aux
    gate_ptr,  # (M, N) gate ("gate_res"), row stride stride_gate: an adaLN chunk view
    o1_ptr,  # (M, N) first output, contiguous
    o2_ptr,  # (M, N) second output, contiguous (unused for "none")
    colsum_ptr,  # (cdiv(M, BLOCK_M), N) fp32 partial column sums of o1, unused unless COL_SUMS
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_aux,
    stride_gate,
    EPILOGUE: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COL_SUMS: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: bf16 operands to fp32 before tl.dot
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 operands, "tf32" (ignored) for bf16
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ram = (rm % M).to(tl.int64)  # wrapped rows/cols: loads need no M/N masks, stores are masked
    rbn = (rn % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + ram[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rbn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kmask = rk < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mmask = rm < M
    mask = mmask[:, None] & (rn < N)[None, :]
    r64 = rm.to(tl.int64)[:, None]
    dense = r64 * N + rn[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 0:
        o1 = to_dtype(acc, o1_ptr.dtype.element_ty)
    elif EPILOGUE == 1:
        o1 = to_dtype(acc, o1_ptr.dtype.element_ty)
        tl.store(o2_ptr + dense, to_dtype(_act(o1.to(tl.float32), ACT), o2_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == 2:
        o1 = to_dtype(acc, o1_ptr.dtype.element_ty)
        g = tl.load(gate_ptr + r64 * stride_gate + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        res = tl.load(aux_ptr + r64 * stride_aux + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(o2_ptr + dense, to_dtype(res + g * o1.to(tl.float32), o2_ptr.dtype.element_ty), mask=mask)
    else:
        h = tl.load(aux_ptr + r64 * stride_aux + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        o1 = to_dtype(acc * _act_grad(h, ACT), o1_ptr.dtype.element_ty)
        tl.store(o2_ptr + dense, to_dtype(_act(h, ACT), o2_ptr.dtype.element_ty), mask=mask)
    tl.store(o1_ptr + dense, o1, mask=mask)
    if COL_SUMS:
        part = tl.sum(tl.where(mask, o1.to(tl.float32), 0.0), axis=0)
        tl.store(colsum_ptr + pid_m * N + rn, part, mask=rn < N)


@triton.jit
def _gate_bwd_kernel(
    dout_ptr,  # (M, N) gradient of out = res + gate * b, contiguous
    gate_ptr,  # (M, N) gate, row stride stride_gate
    b_ptr,  # (M, N) the stored branch output b, contiguous
    db_ptr,  # (M, N) output: dout * gate
    dgate_ptr,  # (M, N) output: dout * b
    colsum_ptr,  # (cdiv(M, BLOCK_M), N) fp32 partial column sums of db (the bias gradient)
    M,
    N,
    stride_gate,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    dense = r64 * N + cols[None, :]
    dout = tl.load(dout_ptr + dense, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + r64 * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + dense, mask=mask, other=0.0).to(tl.float32)
    db = to_dtype(dout * g, db_ptr.dtype.element_ty)
    tl.store(db_ptr + dense, db, mask=mask)
    tl.store(dgate_ptr + dense, to_dtype(dout * b, dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(colsum_ptr + pid * N + cols, tl.sum(db.to(tl.float32), axis=0), mask=cols < N)


# ----------------------------------------------------------------------------- launchers


def linear_epilogue(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    epilogue: str = "none",
    act: str = "gelu_tanh",
    aux: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    col_sums: bool = False,
):
    """a (M, K) @ b (K, N) with a fused epilogue (see the module comment).

    Returns o1, or (o1, o2) for the two-output epilogues; with col_sums, also o1's column sums (N,) fp32.
    Output dtype is a's. aux and gate need unit column stride (rows may be strided).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"linear_epilogue: a {tuple(a.shape)} @ b {tuple(b.shape)} do not chain")
    ep = EPILOGUES[epilogue]
    m, k = a.shape
    n = b.shape[1]
    need_aux, need_gate = ep in (2, 3), ep == 2
    for name, t, need in (("aux", aux, need_aux), ("gate", gate, need_gate)):
        if need and (t is None or t.shape != (m, n) or t.stride(1) != 1):
            raise ValueError(f"linear_epilogue({epilogue!r}) needs {name} of shape {(m, n)} with unit column stride")
    check_device(a, b)
    o1 = torch.empty(m, n, device=a.device, dtype=a.dtype)
    o2 = torch.empty_like(o1) if ep else o1
    # Column-sum partials are indexed by the M tile: room for the smallest BLOCK_M of the configs (32)
    part_rows = triton.cdiv(m, 32) if col_sums else 1
    colsum = torch.zeros(part_rows, n, device=a.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    # The interpreter skips the autotuner: its tiles follow the problem (fastross.kernels._common)
    kernel, tiles = (_linear_kernel.fn, interpreter_matmul_tiles(m, n, k)) if interpreting() else (_linear_kernel, {})
    kernel[grid](
        a,
        b,
        bias if bias is not None else a,
        aux if aux is not None else a,
        gate if gate is not None else a,
        o1,
        o2,
        colsum,
        m,
        n,
        k,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        aux.stride(0) if aux is not None else 0,
        gate.stride(0) if gate is not None else 0,
        EPILOGUE=ep,
        ACT=ACTS[act],
        HAS_BIAS=bias is not None,
        COL_SUMS=col_sums,
        UPCAST=interpreting() and a.dtype != torch.float32,
        DOT_PREC="ieee" if a.dtype == torch.float32 else "tf32",
        **tiles,
    )
    outs = (o1, o2) if ep else (o1,)
    if col_sums:
        outs = outs + (colsum.sum(dim=0),)
    return outs if len(outs) > 1 else outs[0]


def gate_backward(dout: torch.Tensor, gate: torch.Tensor, b: torch.Tensor):
    """Backward of out = res + gate * b: (d_b, d_gate, d_b's column sums (N,) fp32)."""
    m, n = b.shape
    check_device(dout, gate, b)
    dout = dout.contiguous()
    db = torch.empty_like(b)
    dgate = torch.empty(m, n, device=b.device, dtype=gate.dtype)
    bm, bn = row_block(n, elementwise_target())
    nb = triton.cdiv(m, bm)
    part = torch.empty(nb, n, device=b.device, dtype=torch.float32)
    _gate_bwd_kernel[(nb,)](dout, gate, b, db, dgate, part, m, n, gate.stride(0), BLOCK_M=bm, BLOCK_N=bn)
    return db, dgate, part.sum(dim=0)


# ----------------------------------------------------------------------------- references


def act_ref(h: torch.Tensor, act: str) -> torch.Tensor:
    return torch.nn.functional.gelu(h, approximate="tanh") if act == "gelu_tanh" else torch.nn.functional.silu(h)


def linear_epilogue_ref(a, b, *, bias=None, epilogue="none", act="gelu_tanh", aux=None, gate=None):
    """Eager PyTorch, in the inputs' dtype: the same outputs as linear_epilogue (without col_sums)."""
    c = a @ b
    if bias is not None:
        c = c + bias
    if epilogue == "none":
        return c
    if epilogue == "bias_act":
        return c, act_ref(c, act)
    if epilogue == "gate_res":
        return c, aux + gate * c
    h = aux.detach().requires_grad_(True)
    with torch.enable_grad():
        y = act_ref(h, act)
        (dh,) = torch.autograd.grad(y, h, c)
    return dh, y.detach()

"""Every Triton kernel fastross launches compiles for an H100 (sm_90a) here, with no GPU, within its budget.

benchmarks/kernels/compile_report.py --once compiles each kernel once (tiny shapes, bf16; the autotuned matmul at
its act_grad epilogue, the one with the most registers) in a fresh process with TRITON_INTERPRET=0 (this test
process may run the interpreter), and ptxas -v gives registers, spills and stack. The bounds: nothing fails,
nothing spills, every kernel fits 255 registers and 227 KiB of shared memory. The autotuner's pruning and the
occupancy arithmetic are checked without compiling.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "kernels"
sys.path.insert(0, str(BENCH))

import _static as S  # noqa: E402

# fastross: ln_modulate fwd/bwd, silu_cond fwd/bwd, randn, xt, eps_loss fwd/bwd, the matmul, gate_bwd;
# Liger: the fused CE's cross entropy, RMSNorm fwd/bwd, SwiGLU fwd/bwd, RoPE
KERNELS = 16


def test_each_kernel_compiles_for_sm90a_without_spills(tmp_path):
    ptxas = S.ptxas_path("sm_90a")
    if not ptxas.exists():
        pytest.skip(f"Triton's bundled ptxas is missing ({ptxas}): cannot assemble for sm_90a")
    out = tmp_path / "rows.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run(
        [sys.executable, str(BENCH / "compile_report.py"), "--once", "--json", str(out), "--jobs", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == KERNELS, [f"{x['source']}:{x['kernel']}" for x in rows]
    assert {x["arch"] for x in rows} == {"sm_90a"}
    failed = [f"{x['kernel']}: {x['error']}" for x in rows if x["error"]]
    assert not failed, failed
    for x in rows:
        where = f"{x['source']}:{x['kernel']} {x['config']}"
        assert 8 <= x["regs"] <= 255, where
        assert x["spill_bytes"] == 0, f"{where} spills {x['spill_bytes']} bytes"
        assert 0 <= x["smem_bytes"] <= 227 * 1024, where
        assert x["warps_per_sm"] >= x["num_warps"], f"{where}: cannot be resident on an SM"
    matmul = next(x for x in rows if x["kernel"] == "_linear_kernel")
    assert "EPILOGUE=3" in matmul["config"] and matmul["smem_bytes"] > 0  # act_grad, pipelined through smem
    assert (
        r.stdout.strip()
        .splitlines()[-1]
        .startswith(f"compile: arch sm_90a kernels {KERNELS} configs {KERNELS} failed 0 spills 0 over_smem 0 max_regs ")
    )


def test_act_grad_keeps_only_tiles_that_do_not_spill():
    """The autotuner's list and its pruning (kernels/linear_epilogue.py), as compile_report measured them."""
    from fastross.kernels.linear_epilogue import EPILOGUES, _linear_kernel

    at = _linear_kernel  # an Autotuner in either mode (the interpreter only bypasses it at launch)
    tiles = lambda cs: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in cs]  # noqa: E731
    if len(at.configs) == 1:
        pytest.skip("FASTROSS_AUTOTUNE=0: one config")
    assert tiles(at.configs) == [(128, 128, 8), (128, 128, 8), (64, 256, 8), (64, 128, 8), (64, 64, 4)]
    assert tiles(at.early_config_prune(at.configs, {}, EPILOGUE=EPILOGUES["act_grad"])) == [(64, 128, 8), (64, 64, 4)]
    for ep in ("none", "bias_act", "gate_res"):
        assert at.early_config_prune(at.configs, {}, EPILOGUE=EPILOGUES[ep]) == at.configs


@pytest.mark.parametrize(
    "regs,smem,warps,expect",
    [
        (115, 64, 4, (16, "regs")),  # 115 -> 120 regs a thread, 3840 a warp: 17 warps' worth, 4 blocks of 4
        (255, 128 * 1024, 8, (8, "regs")),  # 256 x 32 = 8192 a warp: 8 warps, one block
        (128, 144 * 1024, 4, (4, "smem")),  # 228 KiB / (144 + 1) KiB: one block
        (24, 0, 4, (64, "warps")),  # 768 regs a warp would allow 85 warps: 16 blocks of 4 fill the 64
        (16, 0, 1, (32, "blocks")),  # at most 32 blocks an SM
    ],
)
def test_occupancy_arithmetic(regs, smem, warps, expect):
    occ = S.occupancy(regs, smem, warps)
    assert (occ["warps_per_sm"], occ["limiter"]) == expect


def test_roofline():
    t, bound = S.roofline_us(2 * 46656 * 1024 * 4096, 0, tensor_core=True)  # the 7B fc1: 391 GFLOP
    assert bound == "compute" and t == pytest.approx(395.7, abs=0.1)
    t, bound = S.roofline_us(0, 4 * 95.6e6, tensor_core=False)  # ln_modulate forward's 4 x 95.6 MB
    assert bound == "memory" and t == pytest.approx(114.1, abs=0.1)

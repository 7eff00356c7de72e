"""Every Triton kernel fastross launches, compiled for an H100 (and a B200) on a machine without a GPU.

    python benchmarks/kernels/compile_report.py [--arch sm_90a,sm_100a] [--save] [--quick] [--jobs N]

What is compiled: fastross's own kernels (kernels/*.py) as its launchers call them, every autotune config of
the autotuned matmul, at the 7B recipe's shapes (16 images x 4 replicas x 729 tokens, W = 1024, 4W hidden, 64
folded latent channels) and the tiny recipe's (W = 64), in fp32 and bf16; and the Liger kernels fastross calls
(fused linear cross entropy, RMSNorm, SwiGLU, RoPE) at Qwen2-7B's shapes
(16384 tokens a micro-batch, hidden 3584, MLP 18944, 28/4 heads of 128, vocabulary 152064) and the tiny LLM's.
The launchers run on CPU or meta tensors inside _static.capture(), which records each launch instead of running
it; identical compilations (same kernel, argument types, alignment, constants and options) are compiled once.

For each compilation and arch: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` (100 for
sm_100a), then the ptxas Triton bundles (`ptxas -v -arch=sm_90a`, Triton's own flags) for registers per thread,
spill bytes and stack; shared memory from the compiled metadata against 227 KiB; theoretical occupancy on an H100
SM (65536 registers, 64 warps, 32 blocks, 228 KiB with 1 KiB reserved per block); the roofline time on an H100
(989 TFLOP/s bf16 tensor cores, 67 TFLOP/s fp32, 3.35 TB/s) from the launch's matmul FLOPs and the bytes of the
tensors it is given (a floor: each read or written once).

Autotuned configs that the kernel's early_config_prune drops for a launch are compiled too (full report) and
shown as `pruned`; spills, over_smem and max_regs count the configs the autotuner keeps. Ends with one line per
arch:

    compile: arch A kernels K configs C failed F spills S over_smem O max_regs R

K distinct kernels, C distinct compilations, F that failed to compile or assemble, S kept compilations with
spill bytes, O kept compilations over 227 KiB of shared memory, R the most registers per thread among them.
--quick: sm_90a only, the 7B shapes in bf16 only, kept configs only. --save overwrites
benchmarks/results/compile_report.csv (compile-only: no device ran anything).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # before any @triton.jit module is imported: compile, do not interpret

import argparse
import contextlib
import csv
import multiprocessing
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _static as S  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # devtools/ is never installed
RESULTS = REPO / "benchmarks" / "results" / "compile_report.csv"

DENOISER = {  # benchmarks/kernels/bench_denoiser.py's 7b_dit; tiny: configs/tiny_pretrain.yaml's denoiser width
    "7b": dict(n=16, r=4, grid=27, width=1024, ch=64),
    "tiny": dict(n=2, r=4, grid=4, width=64, ch=16),
}
LLM = {  # Qwen2-7B at data.max_tokens 16384; tiny: fastross/demo/make_tiny.py's LLM at max_tokens 512
    "7b": dict(tokens=16384, hidden=3584, inter=18944, heads=28, kv=4, head_dim=128, vocab=152064),
    "tiny": dict(tokens=512, hidden=64, inter=160, heads=4, kv=2, head_dim=16, vocab=1024),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Job:
    """One distinct compilation: a recorded launch with one config; where it came from."""

    source: str  # fastross | liger
    kernel: str
    launch: S.Launch
    config: dict
    kept: bool
    uses: list = field(default_factory=list)  # "label shape dtype" of every launch that compiles to this
    flops: float = 0.0
    tensor_core: bool = False


# ----------------------------------------------------------------------------- the launches


@contextlib.contextmanager
def _no_device_check():
    """fastross's launchers refuse non-CUDA tensors unless interpreting: let them through while recording."""
    from fastross.kernels import adaln, diffusion_loss, linear_epilogue, ln_modulate

    mods = (adaln, diffusion_loss, linear_epilogue, ln_modulate)
    old = [m.check_device for m in mods]
    for m in mods:
        m.check_device = lambda *t: None
    try:
        yield
    finally:
        for m, f in zip(mods, old):
            m.check_device = f


def fastross_launches(shape: str, dtype: torch.dtype):
    """[(label, flops, tensor_core, launch)] for one denoiser step's kernels (forward and backward), on CPU
    tensors that are never written (torch.empty allocates no pages until touched)."""
    from fastross.kernels import adaln as AD, diffusion_loss as DL, linear_epilogue as LE, ln_modulate as LN

    s = DENOISER[shape]
    n, r, tokens, w, c4 = s["n"], s["r"], s["grid"] ** 2, s["width"], s["ch"]
    m = n * r * tokens
    e = lambda *shp, dt=dtype: torch.empty(*shp, dtype=dt)  # noqa: E731
    ada = e(m, 6 * w)
    shift, scale, gate = ada[:, :w], ada[:, w : 2 * w], ada[:, 2 * w : 3 * w]  # adaLN chunk views (row stride 6W)
    x, keys = e(m, w), torch.zeros(n, dtype=torch.int64)
    fp32 = dtype == torch.float32
    calls = [
        ("ln_modulate fwd", 0, lambda: LN.ln_modulate_fwd(x, shift, scale, 1e-6)),
        (
            "ln_modulate bwd",
            0,
            lambda: LN.ln_modulate_bwd(e(m, w), x, scale, e(m, dt=torch.float32), e(m, dt=torch.float32)),
        ),
        (
            "ln_modulate bwd+dres",
            0,
            lambda: LN.ln_modulate_bwd(e(m, w), x, scale, e(m, dt=torch.float32), e(m, dt=torch.float32), dres=e(m, w)),
        ),
        ("silu_cond fwd", 0, lambda: AD.silu_cond_op(e(n, tokens, w), e(n, r, w))),
        ("silu_cond bwd", 0, lambda: AD.silu_cond_bwd_op(e(n, r, tokens, w), e(n, tokens, w), e(n, r, w))),
        ("keyed eps", 0, lambda: DL.keyed_randn_op(keys, r * tokens * c4, DL.EPS_STREAM)),
        ("keyed xi", 0, lambda: DL.keyed_randn_op(keys, tokens * c4, DL.XI_STREAM)),
        (
            "diffusion_xt",
            0,
            lambda: DL.diffusion_xt_op(
                e(n, c4 // 4, 2 * s["grid"], 2 * s["grid"], dt=torch.float32),
                e(n, c4 // 4, 2 * s["grid"], 2 * s["grid"], dt=torch.float32),
                keys,
                e(n, r, dt=torch.float32),
                e(n, r, dt=torch.float32),
                0.0,
                1.0,
                dtype,
            ),
        ),
        ("eps_loss fwd", 0, lambda: DL.eps_loss_op(e(n, r, tokens, c4), keys)),
        ("eps_loss bwd", 0, lambda: DL.eps_loss_bwd_op(e(n, dt=torch.float32), e(n, r, tokens, c4), keys)),
        # the DiT block's matmuls with epilogues (kernels/fused_mlp.py): weights are (out, in), passed transposed
        (
            "fc1 bias_act",
            2 * m * w * 4 * w,
            lambda: LE.linear_epilogue(x, e(4 * w, w).t(), bias=e(4 * w), epilogue="bias_act", act="gelu_tanh"),
        ),
        (
            "fc2 gate_res",
            2 * m * 4 * w * w,
            lambda: LE.linear_epilogue(e(m, 4 * w), e(w, 4 * w).t(), bias=e(w), epilogue="gate_res", aux=x, gate=gate),
        ),
        (
            "fc2 act_grad",
            2 * m * w * 4 * w,
            lambda: LE.linear_epilogue(
                e(m, w), e(w, 4 * w), epilogue="act_grad", act="gelu_tanh", aux=e(m, 4 * w), col_sums=True
            ),
        ),
        (
            "proj gate_res",
            2 * m * w * w,
            lambda: LE.linear_epilogue(e(m, w), e(w, w).t(), bias=e(w), epilogue="gate_res", aux=x, gate=gate),
        ),
        ("gate_backward", 0, lambda: LE.gate_backward(e(m, w), gate, e(m, w))),
    ]
    out = []
    with _no_device_check():
        for label, flops, call in calls:
            with S.capture() as got:
                call()
            out += [(label, flops, not fp32 and flops > 0, launch) for launch in got]
    return out


def liger_launches(shape: str, dtype: torch.dtype):
    """[(label, flops, tensor_core, launch)] for the Liger kernels fastross calls, on meta tensors (the fused CE's
    chunked logits matmuls run on meta too: cuBLAS's, not Triton's; their FLOPs are not the kernels')."""
    from liger_kernel.ops import fused_linear_cross_entropy as FLCE, rms_norm as RMS, rope as ROPE, swiglu as SW

    s = LLM[shape]
    t, h, i = s["tokens"], s["hidden"], s["inter"]
    e = lambda *shp, dt=dtype: torch.empty(*shp, dtype=dt, device="meta")  # noqa: E731
    q, k = e(1, s["heads"], t, s["head_dim"]), e(1, s["kv"], t, s["head_dim"])
    cos, sin = e(1, t, s["head_dim"]), e(1, t, s["head_dim"])

    def rms_pair():
        x, wt = e(t, h), e(h)
        y, xv, rstd, block, warps, mode = RMS.rms_norm_forward(x, wt, 1e-6, 0.0, "llama", None)
        RMS.rms_norm_backward(e(t, h), xv, wt, rstd, 0.0, mode, block, warps, False, None)

    def ce():  # fastross: LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum", accum fp32)
        hidden, weight = e(t, h).requires_grad_(), e(s["vocab"], h).requires_grad_()
        FLCE.fused_linear_cross_entropy_forward(
            hidden,
            weight,
            torch.zeros(t, dtype=torch.int64),
            ignore_index=-100,
            reduction="sum",
            accum_dtype=torch.float32,
        )
        # no backward: fastross's _PrecomputedGrads (fastross/model/text_loss.py) hands Liger's backward an incoming
        # gradient of exactly 1, so its element_mul kernel never launches

    calls = [
        ("fused linear CE", ce),
        ("rms_norm fwd+bwd", rms_pair),
        ("swiglu fwd", lambda: SW.swiglu_forward(e(t, i), e(t, i))),
        ("swiglu bwd", lambda: SW.swiglu_backward(e(t, i), e(t, i), e(t, i))),
        ("rope fwd", lambda: ROPE.rope_forward(q, k, cos, sin)),
        ("rope bwd", lambda: ROPE.rope_backward(q, k, cos, sin)),
    ]
    out = []
    for label, call in calls:
        with S.capture() as got:
            call()
        out += [(label, 0, False, launch) for launch in got]
    return out


def jobs_for(shapes, dtypes, quick: bool) -> list[Job]:
    """The distinct compilations, in order of first use."""
    jobs: dict = {}
    for shape in shapes:
        for dname in dtypes:
            for source, fn in (("fastross", fastross_launches), ("liger", liger_launches)):
                for label, flops, tc, launch in fn(shape, DTYPES[dname]):
                    for config, kept in S.autotune_configs(launch):
                        if quick and not kept:
                            continue
                        sig, consts, attrs, opts = S.specialize(launch, config)
                        key = (
                            launch.fn.fn.__qualname__,
                            launch.fn.fn.__module__,
                            tuple(sig.items()),
                            repr(sorted(consts.items(), key=str)),
                            repr(sorted(attrs.items())),
                            tuple(sorted(opts.items())),
                        )
                        if key not in jobs:
                            jobs[key] = Job(
                                source, launch.fn.fn.__name__, launch, config, kept, flops=flops, tensor_core=tc
                            )
                        job = jobs[key]
                        job.kept = job.kept or kept
                        job.uses.append(f"{label} {shape} {dname}")
    return list(jobs.values())


def once(jobs: list[Job]) -> list[Job]:
    """One compilation per kernel (tests/kernels/test_compile_report.py): the first kept one, and for the
    autotuned matmul the act_grad epilogue's (the most registers) largest kept tile."""
    out: dict = {}
    for j in jobs:
        if not j.kept:
            continue
        key = (j.source, j.kernel)
        if j.kernel == "_linear_kernel":
            if j.launch.kwargs.get("EPILOGUE") == 3 and (key not in out or out[key].launch.kwargs.get("EPILOGUE") != 3):
                out[key] = j
            out.setdefault(key, j)
        else:
            out.setdefault(key, j)
    return list(out.values())


def describe(job: Job) -> str:
    """The job's compile-time constants and options, short: BLOCK_M=128 ... w8 s3."""
    sig, consts, _, opts = S.specialize(job.launch, job.config)
    parts = [f"{k}={v}" for k, v in consts.items() if k.isupper() and v is not None and not k.startswith("UPCAST")]
    parts.append(f"w{opts.get('num_warps', 4)}" + (f" s{opts['num_stages']}" if "num_stages" in opts else ""))
    return f"{job.uses[0].split()[-1]} " + " ".join(parts)


# ----------------------------------------------------------------------------- Inductor's forward kernels


def _dit_block():
    from fastross.model.denoiser import OPS, DiTBlock

    s = DENOISER["7b"]
    with torch.device("meta"):
        block = DiTBlock(s["width"], 16, OPS["torch"])
    x = (s["n"] * s["r"], s["grid"] ** 2, s["width"])
    return block, [x, x]


def _decoder_layer():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    s = LLM["7b"]
    cfg = Qwen2Config(
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        vocab_size=s["vocab"],
        torch_dtype=torch.bfloat16,
    )
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer = Qwen2DecoderLayer(cfg, 0)
    t = 4096  # one packed sequence of 4096 tokens (the kernels' code does not depend on the length)
    return layer, [(1, t, s["hidden"]), (1, t, s["head_dim"]), (1, t, s["head_dim"])]


def inductor_rows(arch: str) -> list[dict]:
    """Inductor's forward kernels (torch.compile's code) for a denoiser DiT block (impl torch) and a Qwen2-7B
    decoder layer, bf16, on fake CUDA tensors: what _static.fake_cuda_inductor makes possible without a device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    rows = []
    for label, build in (("denoiser DiT block fwd", _dit_block), ("Qwen2-7B decoder layer fwd", _decoder_layer)):
        t0 = time.perf_counter()
        module, shapes = build()
        names = [k for k, _ in module.named_parameters()]
        try:
            with S.fake_cuda_inductor(arch) as compiled:
                with FakeTensorMode(allow_non_fake_inputs=True):
                    params = [
                        torch.empty(p.shape, dtype=torch.bfloat16, device="cuda") for _, p in module.named_parameters()
                    ]
                    inputs = [torch.empty(shp, dtype=torch.bfloat16, device="cuda") for shp in shapes]

                def fwd(*flat, module=module, names=names, label=label):
                    p, a = dict(zip(names, flat[: len(names)])), flat[len(names) :]
                    if label.startswith("Qwen2"):
                        return torch.func.functional_call(module, p, (a[0],), {"position_embeddings": (a[1], a[2])})
                    return torch.func.functional_call(module, p, tuple(a))

                S.inductor_forward(fwd, params + inputs)
        except Exception as exc:
            if os.environ.get("COMPILE_REPORT_DEBUG"):
                raise
            msg = " ".join(str(exc).split())[:300]
            rows.append(
                dict(
                    arch=arch,
                    source="inductor",
                    kernel=label,
                    config="",
                    kept=1,
                    error=f"{type(exc).__name__}: {msg}",
                    uses=label,
                    compile_s=round(time.perf_counter() - t0, 2),
                )
            )
            continue
        seen = set()
        for name, cfg, ck in compiled:
            if (name, str(cfg)) in seen:  # the autotuner asks for launchers more than once
                continue
            seen.add((name, str(cfg)))
            usage = S.ptxas_usage(ck.asm["ptx"], arch)
            md = ck.metadata
            config = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f" w{md.num_warps} s{md.num_stages}"
            rows.append(
                dict(
                    arch=arch,
                    source="inductor",
                    kernel=name,
                    config=config,
                    kept=1,
                    **resource_columns(md, usage),
                    error="",
                    uses=label,
                    compile_s=round((time.perf_counter() - t0) / max(1, len(compiled)), 2),
                )
            )
    return rows


def resource_columns(md, usage: dict) -> dict:
    """A compiled kernel's row columns from its metadata MD and ptxas's USAGE: warps, stages, registers, spills,
    shared memory against the H100's limit and the occupancy they allow."""
    occ = S.occupancy(usage["regs"], md.shared, md.num_warps)
    return dict(
        num_warps=md.num_warps,
        num_stages=md.num_stages,
        regs=usage["regs"],
        spill_bytes=usage["spill_bytes"],
        stack=usage["stack"],
        smem_bytes=md.shared,
        over_smem=int(md.shared > S.H100["smem_per_block"]),
        blocks_per_sm=occ["blocks_per_sm"],
        warps_per_sm=occ["warps_per_sm"],
        occupancy=round(occ["occupancy"], 3),
        limiter=occ["limiter"],
    )


# ----------------------------------------------------------------------------- compiling (in worker processes)

_JOBS: list[Job] = []


def _compile(arg):
    idx, arch = arg
    job = _JOBS[idx]
    t0 = time.perf_counter()
    row = dict(
        arch=arch,
        source=job.source,
        kernel=job.kernel,
        config=describe(job),
        kept=int(job.kept),
        uses="; ".join(dict.fromkeys(job.uses)),
    )
    try:
        ck = S.compile_for(job.launch, job.config, arch)
        usage = S.ptxas_usage(ck.asm["ptx"], arch)
        resources = resource_columns(ck.metadata, usage)
        programs = S.grid_size(job.launch, job.config)
        nbytes = S.tensor_bytes(job.launch)
        t_us, bound = S.roofline_us(job.flops, nbytes, job.tensor_core)
        waves = programs / max(1, resources["blocks_per_sm"] * S.H100["sms"])
        row.update(
            **resources,
            programs=programs,
            waves=round(waves, 2),
            gflop=round(job.flops / 1e9, 3),
            mbytes=round(nbytes / 1e6, 3),
            roofline_us=round(t_us, 2),
            bound=bound,
            error="",
        )
    except Exception as exc:  # a compile or assembly failure is a finding: recorded, counted, not fatal
        msg = " ".join(str(exc).split())
        row.update(error=f"{type(exc).__name__}: {msg[:300]}")
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


FIELDS = [
    "date",
    "commit",
    "device",
    "arch",
    "source",
    "kernel",
    "config",
    "kept",
    "num_warps",
    "num_stages",
    "regs",
    "spill_bytes",
    "stack",
    "smem_bytes",
    "over_smem",
    "blocks_per_sm",
    "warps_per_sm",
    "occupancy",
    "limiter",
    "programs",
    "waves",
    "gflop",
    "mbytes",
    "roofline_us",
    "bound",
    "compile_s",
    "error",
    "uses",
]


def progress(i: int, total: int, row: dict) -> str:
    head = f"[{i}/{total}] {row['arch']} {row['source']}:{row['kernel']} {row['config']}"
    if row["error"]:
        return f"{head}  FAILED {row['error'][:160]}"
    return (
        f"{head}{'' if row['kept'] else ' (pruned)'}  regs {row['regs']} spills {row['spill_bytes']} B "
        f"stack {row['stack']} smem {row['smem_bytes'] / 1024:.1f} KiB  occ {row['warps_per_sm']}/64 warps "
        f"({row['limiter']})"
        + (f"  roofline {row['roofline_us']} us {row['bound']}" if row["bound"] else "")
        + f"  [{row['compile_s']} s]"
    )


def summary(arch: str, rows: list[dict]) -> str:
    kept = [r for r in rows if r["kept"] and not r["error"]]
    kernels = len({(r["source"], r["kernel"]) for r in rows})
    failed = sum(1 for r in rows if r["error"])
    spills = sum(1 for r in kept if r["spill_bytes"])
    over = sum(1 for r in kept if r["over_smem"])
    max_regs = max((r["regs"] for r in kept), default=0)
    return (
        f"compile: arch {arch} kernels {kernels} configs {len(rows)} failed {failed} spills {spills} "
        f"over_smem {over} max_regs {max_regs}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--arch", default=None, help="comma-separated: sm_90a (H100/H200), sm_100a (B200); default both, --quick sm_90a"
    )
    p.add_argument("--quick", action="store_true", help="7B shapes in bf16, kept autotune configs only")
    p.add_argument("--save", action="store_true", help=f"overwrite {RESULTS.relative_to(REPO)}")
    p.add_argument("--once", action="store_true", help="each kernel once: tiny shapes, bf16, sm_90a (the test)")
    p.add_argument("--json", default="", help="also write the rows to this file, one JSON object a line")
    p.add_argument(
        "--inductor",
        action="store_true",
        help="also Inductor's forward kernels for a DiT block and a "
        "Qwen2-7B decoder layer (sm_90a; torch.compile's code, compiled without a device)",
    )
    p.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="compiling processes")
    a = p.parse_args(argv)
    archs = (a.arch or ("sm_90a" if a.quick or a.once else "sm_90a,sm_100a")).split(",")
    for arch in archs:
        S.target(arch)  # unknown names fail here
    t_start = time.perf_counter()
    shapes, dtypes = (
        (["7b"], ["bf16"]) if a.quick else (["tiny"], ["bf16"]) if a.once else (["7b", "tiny"], ["fp32", "bf16"])
    )
    print(
        f"compile_report: triton {__import__('triton').__version__}, torch {torch.__version__}, "
        f"archs {','.join(archs)}, shapes {','.join(shapes)}, dtypes {','.join(dtypes)}, "
        f"{a.jobs} processes; no device is used",
        flush=True,
    )
    _JOBS[:] = jobs_for(shapes, dtypes, a.quick or a.once)
    if a.once:
        _JOBS[:] = once(_JOBS)
    print(
        f"compile_report: {len(_JOBS)} distinct compilations per arch "
        f"({sum(j.kept for j in _JOBS)} kept by the autotuners), recorded in "
        f"{time.perf_counter() - t_start:.1f} s",
        flush=True,
    )
    missing = [arch for arch in archs if not S.ptxas_path(arch).exists()]
    if missing:
        print(f"compile_report: no ptxas for {', '.join(missing)} at {S.ptxas_path(missing[0])}", file=sys.stderr)
        return 2
    all_rows: dict[str, list[dict]] = {arch: [] for arch in archs}
    work = [(i, arch) for arch in archs for i in range(len(_JOBS))]
    # a fresh cache: every figure is from a compilation in this run, and the wall time is a cold one's
    with tempfile.TemporaryDirectory(prefix="fastross-compile-report-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(a.jobs) if a.jobs > 1 else contextlib.nullcontext() as pool:
            results = pool.imap(_compile, work) if pool else map(_compile, work)
            for i, row in enumerate(results, 1):
                all_rows[row["arch"]].append(row)
                print(progress(i, len(work), row), flush=True)
        if a.inductor:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            ind = inductor_rows("sm_90a")
            for i, row in enumerate(ind, 1):
                print(progress(i, len(ind), {**dict.fromkeys(FIELDS, ""), **row}), flush=True)
    wall = time.perf_counter() - t_start
    if a.save:
        from devtools import results as R

        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        stamp = dict(date=R.today(), commit=R.commit(), device="none: compiled only, never launched")
        with RESULTS.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            for rows in all_rows.values():
                for r in rows:
                    r.update(stamp)
            if a.inductor:
                for r in ind:
                    r.update(stamp)
            for arch in archs:
                w.writerows(all_rows[arch])
            if a.inductor:
                w.writerows(ind)
        print(f"compile_report: wrote {RESULTS.relative_to(REPO)} (compile-only, no device ran these kernels)")
    for arch in archs:
        rows = all_rows[arch]
        pruned = [r for r in rows if not r["kept"] and not r["error"]]
        if pruned:
            print(
                f"compile_report: {arch}: {len(pruned)} configs the autotuners prune, "
                f"{sum(1 for r in pruned if r['spill_bytes'])} of them spilling, "
                f"{sum(1 for r in pruned if r['over_smem'])} over 227 KiB"
            )
        for r in rows:
            if r["error"]:
                print(f"compile_report: {arch} FAILED {r['source']}:{r['kernel']} {r['config']}: {r['error']}")
    if a.json:
        import json

        with open(a.json, "w") as f:
            for arch in archs:
                f.writelines(json.dumps(r) + "\n" for r in all_rows[arch])
    if a.inductor:
        ok = [r for r in ind if not r["error"]]
        print(
            f"inductor: arch sm_90a graphs 2 kernels {len({r['kernel'] for r in ok})} configs {len(ok)} failed "
            f"{len(ind) - len(ok)} spills {sum(1 for r in ok if r['spill_bytes'])} over_smem "
            f"{sum(1 for r in ok if r['over_smem'])} max_regs {max((r['regs'] for r in ok), default=0)} "
            "(forward only: a backward needs the device, docs/DEVELOPING.md)"
        )
    print(f"compile_report: wall {wall:.0f} s")
    for arch in archs:
        print(summary(arch, all_rows[arch]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

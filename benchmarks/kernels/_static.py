"""Static analysis of Triton kernels for a GPU that is not here (benchmarks/kernels/compile_report.py's helpers).

Nothing here needs a device. A launcher (fastross's or Liger's) is run on meta or CPU tensors inside `capture()`,
which records each `kernel[grid](...)` call instead of launching it; `specialize` turns a recorded call into the
(signature, constexprs, attrs, options) that Triton's runtime would compile on a GPU (pointer alignment and
integer divisibility by 16, integers equal to 1 as constants: the runtime's own rules); `compile_for` compiles it
with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`; `ptxas_usage` runs the ptxas that Triton
bundles on the PTX for registers, spills and stack; `occupancy` and `roofline_us` give what an H100 would do with
that.

Triton APIs used: `triton.compile`, `triton.compiler.ASTSource`, `triton.backends.compiler.GPUTarget` and
`BaseBackend.parse_attr` (public), and three internals with no public equivalent, checked on Triton 3.8:
`triton._C.libtriton.native_specialize_impl` (the runtime's argument specialisation; a Python copy of its rules
stands in where it is missing), and `JITFunction.run` / `Autotuner.run`, which `capture()` replaces for its
duration.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

# H100 SXM (and H200: the same SM) per-SM limits, from NVIDIA's CUDA occupancy tables for compute capability 9.0
H100 = dict(
    sms=132,
    regs_per_sm=65536,
    max_regs_per_thread=255,
    reg_alloc_unit=256,  # registers are allocated per warp in units of 256
    max_warps_per_sm=64,
    max_blocks_per_sm=32,
    smem_per_sm=228 * 1024,
    smem_per_block=227 * 1024,  # the most one block may ask for (dynamic, opt-in)
    smem_reserved_per_block=1024,  # the driver's own shared memory per resident block (sm_8x / sm_9x)
    bf16_tflops=989.0,  # dense tensor-core bf16 (H100 SXM)
    fp32_tflops=67.0,  # CUDA-core fp32 (IEEE fp32 tl.dot and elementwise math run there)
    hbm_tbps=3.35,
)

ARCHS = {"sm_90a": 90, "sm_100a": 100}


def target(arch: str) -> GPUTarget:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose from {', '.join(ARCHS)}")
    return GPUTarget("cuda", ARCHS[arch], 32)


def ptxas_path(arch: str) -> Path:
    """The ptxas Triton itself uses for this arch (triton/backends/nvidia/bin: ptxas; ptxas-blackwell for sm_100+)."""
    name = "ptxas-blackwell" if ARCHS[arch] >= 100 else "ptxas"
    env = os.environ.get(f"TRITON_{name.upper().replace('-', '_')}_PATH")
    return Path(env) if env else Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


# ----------------------------------------------------------------------------- capturing launches


@dataclass
class Launch:
    """One recorded `kernel[grid](*args, **kwargs)`; `autotuner` is set when the kernel was an @triton.autotune."""

    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: object
    autotuner: object = None


@contextlib.contextmanager
def capture():
    """Within the block, Triton launches are recorded into the yielded list instead of run (no device needed)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    old_jit, old_at = JITFunction.run, Autotuner.run

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid))

    def at_run(self, *args, **kwargs):
        grid = kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        launches.append(Launch(self.fn, args, kwargs, grid, autotuner=self))

    JITFunction.run, Autotuner.run = jit_run, at_run
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = old_jit, old_at


def autotune_configs(launch: Launch) -> list[tuple[dict, bool]]:
    """[(config kwargs incl. num_warps/num_stages, kept)] for an autotuned launch: every config of the list, and
    whether the autotuner's early_config_prune keeps it for these arguments; [({}, True)] for a plain launch."""
    at = launch.autotuner
    if at is None:
        return [({}, True)]
    nargs = dict(zip(at.arg_names, launch.args))
    kept = at.configs
    if at.early_config_prune:
        kept = at.early_config_prune(at.configs, nargs, **launch.kwargs)
    kept_ids = {id(c) for c in kept}
    out = []
    for c in at.configs:
        kw = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        if getattr(c, "maxnreg", None):
            kw["maxnreg"] = c.maxnreg
        out.append((kw, id(c) in kept_ids))
    return out


# ----------------------------------------------------------------------------- specialisation, as the runtime does it

try:
    from triton._C.libtriton import native_specialize_impl as _native
except ImportError:  # older or newer Triton: the same rules in Python
    _native = None

_DTYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
    torch.float64: "fp64",
}


def _spec(value, specialize: bool, align: bool):
    if _native is not None:
        return _native(BaseBackend, value, False, specialize, align)
    if value is None:
        return ("constexpr", None)
    if isinstance(value, bool):
        return ("u1", None)
    if isinstance(value, int):
        if specialize and value == 1:
            return ("constexpr", 1)
        ty = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return (ty, "D" if specialize and align and value % 16 == 0 else "")
    if isinstance(value, float):
        return ("fp32", None)
    if isinstance(value, torch.Tensor):
        ptr = value.storage_offset() * value.element_size()  # meta and fresh CPU tensors: the allocation's alignment
        if value.device.type != "meta":
            ptr = value.data_ptr()
        return ("*" + _DTYPES[value.dtype], "D" if align and ptr % 16 == 0 else "")
    raise TypeError(f"cannot specialise a {type(value).__name__} argument")


def specialize(launch: Launch, config: dict):
    """(signature, constexprs, attrs, options) for the launch with this config's kwargs."""
    fn = launch.fn
    kwargs = dict(launch.kwargs, **config)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in kwargs}
    bound = fn.signature.bind(*launch.args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = bound.arguments[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
            continue
        ty, attr = _spec(v, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = v
        elif isinstance(attr, str):
            parsed = BaseBackend.parse_attr(attr)
            if parsed:
                attrs[(i,)] = parsed
    return signature, constexprs, attrs, options


def compile_for(launch: Launch, config: dict, arch: str):
    """The CompiledKernel (asm: ttir, ttgir, llir, ptx, cubin; metadata: shared, num_warps, ...) for `arch`."""
    signature, constexprs, attrs, options = specialize(launch, config)
    return triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target(arch), options=options)


def bound_args(launch: Launch, config: dict) -> dict:
    kwargs = {
        k: v
        for k, v in dict(launch.kwargs, **config).items()
        if k not in ("num_warps", "num_stages", "num_ctas", "maxnreg")
    }
    b = launch.fn.signature.bind(*launch.args, **kwargs)
    b.apply_defaults()
    return dict(b.arguments, **config)


def grid_size(launch: Launch, config: dict) -> int:
    g = launch.grid
    if callable(g):
        g = g(bound_args(launch, config))
    return math.prod(int(x) for x in g)


def tensor_bytes(launch: Launch) -> int:
    """Bytes of the distinct tensors the launch is given, each read or written once: a memory-traffic floor for
    streaming kernels (a matmul's operands are read once per tile column/row: see compile_report's flops)."""
    seen, total = set(), 0
    for v in list(launch.args) + list(launch.kwargs.values()):
        if isinstance(v, torch.Tensor) and id(v) not in seen:
            seen.add(id(v))
            total += v.numel() * v.element_size()
    return total


# ----------------------------------------------------------------------------- ptxas and the H100 model

_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_usage(ptx: str, arch: str) -> dict:
    """Registers per thread, spill bytes (stores + loads) and stack bytes from `ptxas -v -arch=<arch>` on the PTX,
    with the flags Triton compiles with (-lineinfo --regAllocOptLevel=2)."""
    exe = ptxas_path(arch)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [str(exe), "-v", "-lineinfo", "--regAllocOptLevel=2", f"-arch={arch}", str(src), "-o", str(src) + ".o"]
        r = subprocess.run(cmd, capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"ptxas -arch={arch} failed ({r.returncode}): {log.strip()[-400:]}")
    got = {k: int(m.group(1)) if (m := rx.search(log)) else 0 for k, rx in _PTXAS_RE.items()}
    if not _PTXAS_RE["regs"].search(log):
        raise RuntimeError(f"ptxas -v printed no register count: {log.strip()[-400:]}")
    return {"regs": got["regs"], "spill_bytes": got["spill_stores"] + got["spill_loads"], "stack": got["stack"]}


def occupancy(regs: int, smem: int, warps: int, gpu: dict = H100) -> dict:
    """Theoretical residency per SM: blocks and warps, and what limits them (regs, smem, warps or blocks)."""
    per_warp = math.ceil(max(regs, 1) * 32 / gpu["reg_alloc_unit"]) * gpu["reg_alloc_unit"]
    limits = {
        "regs": (gpu["regs_per_sm"] // per_warp) // warps,
        "warps": gpu["max_warps_per_sm"] // warps,
        "blocks": gpu["max_blocks_per_sm"],
        "smem": gpu["smem_per_sm"] // (smem + gpu["smem_reserved_per_block"]) if smem else gpu["max_blocks_per_sm"],
    }
    if smem > gpu["smem_per_block"] or regs > gpu["max_regs_per_thread"]:
        limits["smem" if smem > gpu["smem_per_block"] else "regs"] = 0
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "regs"))
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "occupancy": blocks * warps / gpu["max_warps_per_sm"],
        "limiter": limiter,
    }


def roofline_us(flops: float, nbytes: float, tensor_core: bool, gpu: dict = H100) -> tuple[float, str]:
    """max(compute, memory) time in microseconds, and which bound it is."""
    peak = (gpu["bf16_tflops"] if tensor_core else gpu["fp32_tflops"]) * 1e12
    t_c, t_m = flops / peak, nbytes / (gpu["hbm_tbps"] * 1e12)
    return max(t_c, t_m) * 1e6, ("compute" if t_c > t_m else "memory")


# ----------------------------------------------------------------------------- Inductor without a device


@contextlib.contextmanager
def fake_cuda_inductor(arch: str = "sm_90a"):
    """Lets Inductor generate and compile (Triton -> cubin) CUDA kernels for fake CUDA tensors with no GPU.

    Yields a list that receives (kernel name, triton.Config, CompiledKernel) for every config Inductor compiles.
    Forward graphs only: tracing a backward runs the autograd engine, which asks the CUDA driver for device 0's
    primary context (`hasPrimaryContext expects a valid device index`), in C++, where no patch reaches.

    The patches (torch 2.14, Triton 3.8; all private, all undone on exit):
      1. torch.cuda.get_device_properties / get_device_capability / current_device: an H100's figures
         (Inductor's DeviceProperties, its reduction heuristics and the bf16 check read them);
      2. Dynamo's CudaInterface (is_available, device properties, bf16 support, its worker's cached properties):
         Inductor's has_triton() and scheduling ask it, not torch.cuda;
      3. Triton's active driver: one whose get_current_target() is GPUTarget("cuda", 90, 32);
      4. triton_helpers.set_driver_to_gpu, which each generated kernel module calls: a no-op (it looks for a live
         driver);
      5. config.use_static_cuda_launcher = False: compile results are Triton CompiledKernels (with asm) ...
      6. ... and CachingAutotuner._make_launchers, which loads the cubin onto the device: records them instead;
      7. config.joint_graph_constant_folding = False: that pass runs constant subgraphs on the device (the
         DiT block has one); config.shape_padding = False (pad_mm times matmuls on the device, the decoder
         layer's attention has one); config.fx_graph_cache = False, so that every kernel is compiled and recorded.
    """
    import types

    import torch._inductor.config as IC
    from torch._dynamo import device_interface as DI
    from torch._inductor.runtime import triton_helpers
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    from triton.runtime import driver

    props = types.SimpleNamespace(
        name="NVIDIA H100 80GB HBM3 (no device: compile only)",
        major=ARCHS[arch] // 10,
        minor=0,
        multi_processor_count=H100["sms"],
        regs_per_multiprocessor=H100["regs_per_sm"],
        max_threads_per_multi_processor=2048,
        max_threads_per_block=1024,
        warp_size=32,
        total_memory=80 * 2**30,
        L2_cache_size=50 * 2**20,
        shared_memory_per_block_optin=H100["smem_per_block"],
        gcnArchName="",
    )
    tgt = target(arch)

    class _Driver:
        def get_current_target(self):
            return tgt

        def get_current_device(self):
            return 0

        def get_device_interface(self):
            return torch.cuda

        def is_active(self):
            return True

    compiled: list = []

    def _record(self):
        for r in self.compile_results:
            compiled.append((self.fn.__name__, r.config, r.kernel))

    saved = [
        (torch.cuda, "get_device_properties"),
        (torch.cuda, "get_device_capability"),
        (torch.cuda, "current_device"),
        (DI.CudaInterface, "get_device_properties"),
        (DI.CudaInterface, "current_device"),
        (DI.CudaInterface, "device_count"),
        (DI.CudaInterface, "is_bf16_supported"),
        (DI.CudaInterface, "is_available"),
        (triton_helpers, "set_driver_to_gpu"),
        (CachingAutotuner, "_make_launchers"),
        (IC, "use_static_cuda_launcher"),
        (IC, "compile_threads"),
        (IC, "joint_graph_constant_folding"),
        (IC, "fx_graph_cache"),
        (IC, "shape_padding"),
    ]
    saved = [(obj, name, obj.__dict__.get(name, getattr(obj, name))) for obj, name in saved]
    old_props = DI.caching_worker_device_properties.get("cuda")
    old_driver = driver._active  # None until something asked for it (and, with no GPU, asking raises)
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.get_device_capability = lambda *a, **k: (props.major, props.minor)
    torch.cuda.current_device = lambda: 0
    DI.CudaInterface.get_device_properties = staticmethod(lambda *a, **k: props)
    DI.CudaInterface.current_device = staticmethod(lambda: 0)
    DI.CudaInterface.device_count = staticmethod(lambda: 1)
    DI.CudaInterface.is_bf16_supported = staticmethod(lambda *a, **k: True)
    DI.CudaInterface.is_available = staticmethod(lambda: True)
    DI.caching_worker_device_properties["cuda"] = [props]
    triton_helpers.set_driver_to_gpu = lambda: None
    CachingAutotuner._make_launchers = _record
    IC.use_static_cuda_launcher = False
    IC.compile_threads = 1
    IC.joint_graph_constant_folding = False  # it evaluates constant subgraphs on the device
    IC.fx_graph_cache = False  # a cache hit would skip the compilations recorded here
    IC.shape_padding = False  # pad_mm times padded and unpadded matmuls on the device
    driver.set_active(_Driver())
    try:
        yield compiled
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)
        if old_props is None:
            DI.caching_worker_device_properties.pop("cuda", None)
        else:
            DI.caching_worker_device_properties["cuda"] = old_props
        driver._active = old_driver


def inductor_forward(fn, example_inputs):
    """Inductor's forward code for fn on fake CUDA tensors (inside fake_cuda_inductor): the compiled callable."""
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn, tracing_mode="fake")(*example_inputs)
    return compile_fx(gm, list(example_inputs))

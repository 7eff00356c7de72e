"""What benchmarks/kernels/bench_*.py share: arguments, timing, peak memory, the device's own
bf16 matmul rate and copy bandwidth (measured in the same run), a readable table, CSV rows
(appended only with --save, or to the file --csv names).

Providers (the issue's ladder): `reference` (fp32 eager, TF32 matmuls allowed, the reference
recipe's way of doing it), `torch_bf16` (eager bf16), `torch_bf16_compiled` (torch.compile of
the bf16 module), `fastross` (the Triton kernels). Modes: `forward` (with autograd recording,
as in training), `backward` (given a recorded forward), `full` (both).

Without a CUDA device the scripts refuse, unless `--smoke` asks for a tiny shape on the CPU
(the Triton kernels then run in the interpreter): that exercises every code path, and its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastross.flops import measured_cpu_peak

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: devtools/ is never installed
from devtools import results as R  # noqa: E402

PROVIDERS = ("reference", "torch_bf16", "fastross", "torch_bf16_compiled")  # run in this order: compiling is slowest
MODES = ("forward", "backward", "full")
RESULTS = R.RESULTS / "kernels.csv"
FIELDS = [
    "date",
    "commit",
    "device",
    "bench",
    "shape",
    "provider",
    "mode",
    "ms",
    "peak_mib",
    "tflops",
    "gbps",
    "floor_ms",
    "copy_gbps",
    "matmul_tflops",
]


def parse_args(description: str, shapes: list[str], argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny shape on whatever device there is (CPU: interpreter)")
    p.add_argument("--shapes", default=",".join(shapes), help=f"comma-separated, of: {', '.join(shapes)}")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ", ".join(PROVIDERS))
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    p.add_argument("--save", action="store_true", help=f"append the rows to {RESULTS.relative_to(R.REPO)}")
    p.add_argument("--csv", default="", help="another CSV file the rows are appended to (gpu_check.sh's)")
    a = p.parse_args(argv)
    if a.save and not a.csv:
        a.csv = str(RESULTS)
    a.shapes = ["smoke"] if a.smoke else a.shapes.split(",")
    a.providers = a.providers.split(",")
    a.modes = a.modes.split(",")
    for name, got, known in (
        ("--shapes", a.shapes, shapes + ["smoke"]),
        ("--providers", a.providers, PROVIDERS),
        ("--modes", a.modes, MODES),
    ):
        bad = [x for x in got if x not in known]
        if bad:
            p.error(f"{name}: unknown {bad}; choose from {', '.join(known)}")
    if not torch.cuda.is_available() and not a.smoke:
        print(
            f"{Path(sys.argv[0]).name}: needs a CUDA GPU for real numbers; run with --smoke for a tiny CPU run "
            "(Triton interpreter) that only exercises the code",
            file=sys.stderr,
        )
        sys.exit(2)
    return a


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke, Triton interpreter)"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], reps: int = 20, grad_to_none=None) -> float:
    """Median time of fn in ms: triton's do_bench (CUDA events, L2 flushed) on a GPU, perf_counter on CPU."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))
    fn()
    times = []
    for _ in range(max(1, min(reps, 3))):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_tflops() -> float:
    """The bf16 matmul rate this device reaches in this run (TFLOP/s): an 8192^3 torch.mm on a GPU; on CPU the fp32
    rate the trainer's MFU divides by (fastross.flops.measured_cpu_peak)."""
    if not torch.cuda.is_available():
        return measured_cpu_peak()
    n = 8192
    a = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_gbps() -> float:
    """Device copy bandwidth in this run (GB/s): read + write of a 1 GiB buffer (16 MiB on CPU)."""
    n = (1 << 30) if torch.cuda.is_available() else (1 << 24)
    x = torch.empty(n, dtype=torch.uint8, device=device())
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x))
    return 2 * n / (ms * 1e-3) / 1e9


@dataclass
class Case:
    """One provider at one shape: `forward()` runs it with autograd recording and returns a tensor (or a
    tuple of them); `leaves` are the tensors (inputs, parameters) whose .grad the backward fills."""

    forward: Callable[[], torch.Tensor]
    leaves: list = field(default_factory=list)


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def measure(case: Case, mode: str) -> tuple[float, float]:
    """(ms, peak MiB above what was allocated before) of one mode; peak is NaN on CPU."""
    dys = [torch.randn_like(o) for o in _outputs(case.forward())]
    for t in case.leaves:
        t.grad = None
    if mode == "forward":
        fn = case.forward
    elif mode == "backward":
        outs = _outputs(case.forward())
        fn = lambda: torch.autograd.backward(outs, dys, retain_graph=True)  # noqa: E731
    else:
        fn = lambda: torch.autograd.backward(_outputs(case.forward()), dys)  # noqa: E731
    ms = time_ms(fn, grad_to_none=case.leaves)
    peak = float("nan")
    if torch.cuda.is_available():
        for t in case.leaves:
            t.grad = None
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return ms, peak


class Report:
    """Collects rows; prints a table; appends CSV rows with device, commit and date."""

    def __init__(self, bench: str, csv_path: str):
        self.bench, self.csv_path = bench, csv_path
        self.rows: list[dict] = []
        self.device, self.commit = device_name(), R.commit()
        self.date = datetime.datetime.now().isoformat(timespec="seconds")

    def add(self, **row) -> dict:
        """Record a row, print it, and append it to the CSV at once (a run stopped later keeps it)."""
        row = {"date": self.date, "commit": self.commit, "device": self.device, "bench": self.bench, **row}
        self.rows.append(row)
        print(f"  {row['shape']} {row['provider']} {row['mode']}: {row['ms']:.3f} ms", flush=True)
        if self.csv_path:
            path = Path(self.csv_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists()
            with path.open("a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
        return row

    def find(self, shape: str, provider: str, mode: str) -> dict | None:
        for r in self.rows:
            if (r["shape"], r["provider"], r["mode"]) == (shape, provider, mode):
                return r
        return None

    def print_table(self) -> None:
        cols = [
            ("shape", 10),
            ("provider", 20),
            ("mode", 9),
            ("ms", 10),
            ("peak_mib", 10),
            ("tflops", 8),
            ("gbps", 8),
            ("floor_ms", 9),
        ]
        print(f"\n{self.bench} on {self.device} (commit {self.commit}, {self.date})")
        print("  ".join(f"{c:>{w}}" for c, w in cols))
        for r in self.rows:
            cells = []
            for c, w in cols:
                v = r.get(c, "")
                cells.append(f"{v:>{w}.3f}" if isinstance(v, float) else f"{v!s:>{w}}")
            print("  ".join(cells))

    def print_saved(self) -> None:
        """Say where the rows went (add() appended each as it came)."""
        if self.csv_path:
            print(f"{len(self.rows)} rows appended to {self.csv_path}")


def run_all(
    args,
    bench: str,
    cases: Callable[[str, str], Case | None],
    matmul_flops: Callable[[str, str], float],
    bytes_moved: Callable[[str, str], float] | None = None,
    after_shape: Callable[[Report, str], None] | None = None,
) -> Report:
    """Every (shape, provider, mode) of the arguments, with the floor and bandwidth columns filled in.

    after_shape(report, shape) runs when a shape is done (a summary printed early survives a timeout)."""
    rep = Report(bench, args.csv)
    rate = matmul_tflops()
    bw = copy_gbps()
    print(f"{bench}: device {rep.device}: bf16 matmul {rate:.1f} TFLOP/s, copy {bw:.1f} GB/s (measured now)")
    for shape in args.shapes:
        for provider in args.providers:
            case = cases(shape, provider)
            if case is None:
                continue
            for mode in args.modes:
                ms, peak = measure(case, mode)
                flops = matmul_flops(shape, mode)
                row = dict(
                    shape=shape,
                    provider=provider,
                    mode=mode,
                    ms=ms,
                    peak_mib=peak,
                    tflops=flops / (ms * 1e-3) / 1e12 if flops else float("nan"),
                    floor_ms=flops / (rate * 1e12) * 1e3,
                    copy_gbps=bw,
                    matmul_tflops=rate,
                )
                if bytes_moved is not None:
                    row["gbps"] = bytes_moved(shape, mode) / (ms * 1e-3) / 1e9
                rep.add(**row)
            del case
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if after_shape is not None:
            after_shape(rep, shape)
    rep.print_table()
    rep.print_saved()
    return rep


def compiled(module_or_fn):
    """torch.compile, the `torch_bf16_compiled` provider."""
    return torch.compile(module_or_fn)


def report_main(
    description: str,
    bench: str,
    shapes: dict,
    cases,
    matmul_flops,
    bytes_moved,
    label: str,
    metric,
    argv=None,
    setup=None,
) -> int:
    """main() of a kernel benchmark: every provider, then one summary line per shape for fastross.

    metric(row) -> str formats one mode's figure (share of copy bandwidth, or of the matmul floor).
    """
    args = parse_args(description, [k for k in shapes if k != "smoke"], argv)
    if setup is not None:
        setup()
    rep = run_all(args, bench, cases, matmul_flops, bytes_moved)
    for shape in args.shapes:
        parts = [f"{mode} {metric(row)}" for mode in args.modes if (row := rep.find(shape, "fastross", mode))]
        print(f"{bench} {shape}: fastross {label}" + ", ".join(parts))
    return 0


def memory_bound_main(description: str, bench: str, shapes: dict, cases, bytes_moved, argv=None) -> int:
    """main() of a memory-bound kernel's benchmark: fastross's share of the copy bandwidth."""
    return report_main(
        description,
        bench,
        shapes,
        cases,
        lambda shape, mode: 0.0,
        bytes_moved,
        "",
        lambda row: f"{row['gbps']:.0f} GB/s = {100 * row['gbps'] / row['copy_gbps']:.0f}% of copy",
        argv,
    )

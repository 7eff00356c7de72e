"""What the trainer's per-step non-finite check costs (fastross.train.finite_everywhere).

    python benchmarks/nonfinite.py [--steps 200] [--step-ms 50]

The check is one all-reduce of two flags (a world of one here) and one `.item()`, the host sync. On CPU there is no
queue to stall, so its cost is its own work: timed alone, --steps times. On a GPU the sync also holds the host until
the GPU has finished the step, so the next step's first kernels are queued late: each "step" is a loop of matmuls of
about --step-ms, queued asynchronously as the training step is, run --steps times without and with the check, and
the difference per step is the check's cost. Prints one line: `nonfinite: check X ms/step ...`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fastross.train import finite_everywhere


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--step-ms", type=float, default=50.0, help="the simulated step's length")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    with tempfile.TemporaryDirectory(prefix="fastross-nonfinite-") as tmp:
        dist.init_process_group(
            "nccl" if cuda else "gloo", store=dist.FileStore(str(Path(tmp) / "store"), 1), rank=0, world_size=1
        )
        try:
            print(measure(a, cuda, device))
        finally:
            dist.destroy_process_group()


def measure(a, cuda: bool, device: torch.device) -> str:
    name = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
    if not cuda:  # no queue to stall: the cost is the check's own work, timed alone
        losses, norm = torch.rand(4, 2), torch.rand(())
        for _ in range(10):
            finite_everywhere(losses, norm)
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            finite_everywhere(losses, norm)
            times.append(time.perf_counter() - t0)
        return f"nonfinite: check {statistics.median(times) * 1e3:.3f} ms/step (median of {a.steps}) on {name}"
    n = 4096
    x = torch.randn(n, n, device=device) / n**0.5

    def step(per: int) -> torch.Tensor:
        y = x
        for _ in range(per):
            y = torch.tanh(y @ x)
        return y

    step(20)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(20)
    torch.cuda.synchronize()
    per = max(1, round(a.step_ms / 1000 / ((time.perf_counter() - t0) / 20)))

    def run(check: bool) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            y = step(per)
            if check:
                finite_everywhere(y[:4, :2], y.norm())
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / a.steps

    run(True)  # warm-up
    base, checked = run(False), run(True)
    cost = checked - base
    return f"nonfinite: check {cost * 1e3:.3f} ms/step ({cost / base:.2%} of a {base * 1e3:.1f} ms step) on {name}"


if __name__ == "__main__":
    main()

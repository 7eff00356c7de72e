"""What the trainer's per-step non-finite check costs (fastross.train.finite_everywhere).

    python benchmarks/nonfinite.py [--steps 200] [--step-ms 50]

Each "step" is a loop of matmuls of about --step-ms (on CUDA: queued asynchronously, as the training step is),
run --steps times without and with the check: one all-reduce of two flags (a world of one here) and one `.item()`,
the host sync. The difference per step is the check's cost. On CPU that is the check's own work; on a GPU it also
holds the host until the GPU has finished the step, so the next step's first kernels are queued late.
Prints one line: `nonfinite: check X ms/step (Y% of a Z ms step) on DEVICE`.
"""

from __future__ import annotations

import argparse
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
    store = Path(tempfile.mkdtemp(prefix="fastross-nonfinite-")) / "store"
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.FileStore(str(store), 1), rank=0, world_size=1)
    n = 4096 if cuda else 256
    x = torch.randn(n, n, device=device) / n**0.5

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # Calibrate the matmuls per step to about --step-ms.
    sync()
    t0 = time.perf_counter()
    for _ in range(20):
        y = x @ x
    sync()
    per = max(1, round(a.step_ms / 1000 / ((time.perf_counter() - t0) / 20)))

    def run(check: bool) -> float:
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            y = x
            for _ in range(per):
                y = torch.tanh(y @ x)
            losses = y[:4, :2].sum(0, keepdim=True)  # stands for the micro-batches' loss sums
            norm = y.norm()
            if check:
                finite_everywhere(losses, norm)
            times.append(time.perf_counter() - t0)
        sync()
        return statistics.median(times)

    run(False)  # warm-up
    base, checked = run(False), run(True)
    if cuda:  # without the check the host only queues: the GPU's time is the step's
        sync()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            y = x
            for _ in range(per):
                y = torch.tanh(y @ x)
        sync()
        base = (time.perf_counter() - t0) / a.steps
    dist.destroy_process_group()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    cost = checked - base
    print(f"nonfinite: check {cost * 1e3:.3f} ms/step ({cost / base:.2%} of a {base * 1e3:.1f} ms step) on {name}")


if __name__ == "__main__":
    main()

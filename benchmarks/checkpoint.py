"""Checkpoint benchmark: seconds a save blocks the training loop, synchronous vs asynchronous DCP.

    python benchmarks/checkpoint.py [--params-mb 256] [--saves 3] [--step-ms 200] [--save]

One process (a gloo world of one) holds an fp32 model of about --params-mb MB and its AdamW
state (3x that in all) and runs fastross.checkpoint.Checkpointer as the trainer does: a save
every 3 "steps" (a matmul loop of --step-ms), --saves saves per mode. For each mode it prints
the median blocked seconds (what the trainer logs as ckpt_blocked_s: waiting for the previous
write, staging, the small files) and, for async, the median seconds from staging until the
checkpoint was complete (the write that overlaps training), then the ratio sync / async, and
what verifying a checkpoint's manifest costs (sha256 of every file, several files at once; the
files just written, so from the page cache: a cold read adds the disk's own time). Rank 0 pays
that hashing once per save (inside the sync blocked time; in the background thread for async)
and once per load.
Checkpoints go to a temp dir; --save appends a CSV row to benchmarks/results/checkpoint.csv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fastross import checkpoint
from fastross.checkpoint import Checkpointer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: devtools/ is never installed
from devtools import results as R  # noqa: E402


def build(params_mb: float, width: int = 1024):
    layers = max(1, round(params_mb * 2**20 / 4 / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(8, width)).square().mean().backward()
    opt.step()
    return model, opt


def busy(ms: float, x: torch.Tensor) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        x = torch.tanh(x @ x)


def run_mode(root: Path, async_save: bool, model, opt, saves: int, step_ms: float) -> dict:
    ck = Checkpointer(root, rank=0, keep=2, async_save=async_save)
    x = torch.randn(256, 256) / 16
    blocked, written = [], []
    for n in range(1, saves + 1):
        for _ in range(3):  # training steps between saves (they change the weights in place)
            busy(step_ms, x)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.999)
        report = ck.save(n, model, opt, {"step": n}, "")
        blocked.append(report.blocked_s)
        t0 = time.perf_counter()
        ck.wait()  # measured apart from the blocked time: how long the background write took
        written.append(report.blocked_s + time.perf_counter() - t0)
    ck.close()
    latest = ck.latest()
    gib = sum(f.stat().st_size for f in latest.iterdir()) / 2**30
    t0 = time.perf_counter()
    assert checkpoint.verify(latest) is None
    return {
        "blocked": statistics.median(blocked),
        "complete": statistics.median(written),
        "verify_s_per_gib": (time.perf_counter() - t0) / gib,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params-mb", type=float, default=256.0, help="fp32 parameter MB (AdamW state adds 2x)")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--step-ms", type=float, default=200.0, help="simulated training step between saves")
    p.add_argument("--save", action="store_true", help="append a row to benchmarks/results/checkpoint.csv")
    a = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fastross-ckpt-bench-"))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp / "store"), 1), rank=0, world_size=1)
    model, opt = build(a.params_mb)
    state_mb = 3 * sum(q.numel() * q.element_size() for q in model.parameters()) / 2**20
    res = {mode: run_mode(tmp / mode, mode == "async", model, opt, a.saves, a.step_ms) for mode in ("sync", "async")}
    dist.destroy_process_group()
    subprocess.run(["rm", "-rf", str(tmp)], check=False)

    print(f"{'mode':6} {'state MB':>9} {'blocked s':>10} {'complete s':>11}")
    for mode, r in res.items():
        print(f"{mode:6} {state_mb:9.0f} {r['blocked']:10.3f} {r['complete']:11.3f}")
    ratio = res["sync"]["blocked"] / res["async"]["blocked"]
    print(f"checkpoint: blocked sync/async {ratio:.2f}x ({state_mb:.0f} MB state, median of {a.saves} saves)")
    print(f"checkpoint: verifying the manifest (sha256) {res['sync']['verify_s_per_gib']:.2f} s/GiB")
    if a.save:
        device = "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
        out = R.append_csv(
            "checkpoint.csv",
            [
                "date",
                "commit",
                "device",
                "state_mb",
                "saves",
                "sync_blocked_s",
                "async_blocked_s",
                "async_complete_s",
                "ratio",
            ],
            [
                [
                    R.today(),
                    R.commit(),
                    device,
                    round(state_mb),
                    a.saves,
                    f"{res['sync']['blocked']:.4f}",
                    f"{res['async']['blocked']:.4f}",
                    f"{res['async']['complete']:.4f}",
                    f"{ratio:.3f}",
                ]
            ],
        )
        print(f"appended to {out}")


if __name__ == "__main__":
    main()

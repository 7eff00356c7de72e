"""Planner benchmark: the native planner (fastross._native) against the plain-Python reference.

    python benchmarks/planner.py [--sizes 1000000 10000000 100000000] [--threads 2]

Plans whole epochs of lengths drawn from the default stage-2 mix (fastross/data/default_mix.py) (7B recipe:
global batch 128, 8 ranks, max_tokens 16384), timing `plan_epoch` (every step planned, per-step
summaries kept) with the native twin and with the Python reference. The reference runs only
where its estimate is under a minute and is extrapolated linearly beyond (marked so). Where both
ran, their summaries must be identical. Ends with `planner: n100M_native_s S speedup_1M X`;
--save appends CSV rows to benchmarks/results/planner.csv.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from fastross.data import packing_planner
from fastross.data.default_mix import QWEN2_7B, draw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: devtools/ is never installed
from devtools import results as R  # noqa: E402


def lengths_of(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    for first in range(0, n, 10_000_000):  # in chunks: bounded temporaries at 100M
        last = min(n, first + 10_000_000)
        out[first:last] = draw(rng, last - first)[0]
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--reference-budget-s", type=float, default=60.0)
    p.add_argument("--save", action="store_true", help="append rows to benchmarks/results/planner.csv")
    a = p.parse_args(argv)
    if packing_planner.NATIVE is None:
        print("planner: error: fastross._native is not built; run `pip install -e .`", file=sys.stderr)
        return 2
    attn = packing_planner.attention_cost_tokens(**QWEN2_7B)
    args = (a.global_batch, a.ranks, a.max_tokens, attn)
    rows, ref_rate = [], None
    print(f"{'samples':>12} {'native s':>10} {'reference s':>12} {'speedup':>8}  note")
    for n in sorted(a.sizes):
        lengths = lengths_of(n, seed=n)
        # partial, not a lambda: it binds this size's lengths now, and the `del lengths` below frees them
        native_s, summary = timed(
            partial(packing_planner.plan_epoch, lengths, *args, threads=a.threads), 3 if n <= 10**7 else 1
        )
        estimate = ref_rate * n if ref_rate else 0.0
        if estimate < a.reference_budget_s:
            ref_s, ref = timed(partial(packing_planner.plan_epoch_ref, lengths, *args), 1)
            for field in ("micro_batches", "imbalance", "tokens", "slots"):
                if not np.array_equal(getattr(summary, field), getattr(ref, field)):
                    print(
                        f"planner: error: native and reference plans differ ({field}) at {n} samples", file=sys.stderr
                    )
                    return 1
            ref_rate, note = ref_s / n, "measured; plans identical"
        else:
            ref_s, note = estimate, "reference extrapolated"
        rows.append((n, native_s, ref_s, note))
        print(f"{n:>12} {native_s:>10.3f} {ref_s:>12.3f} {ref_s / native_s:>8.1f}  {note}")
        del lengths
    if a.save:
        out = R.append_csv(
            "planner.csv",
            ["date", "commit", "device", "threads", "samples", "native_s", "reference_s", "note"],
            [
                [
                    R.today(),
                    R.commit(),
                    f"cpu {platform.machine()} x{os.cpu_count()}",
                    a.threads,
                    n,
                    f"{ns:.4f}",
                    f"{rs:.4f}",
                    note,
                ]
                for n, ns, rs, note in rows
            ],
        )
        print(f"appended to {out}")
    by = {n: (ns, rs) for n, ns, rs, _ in rows}
    s100 = by.get(100_000_000, (float("nan"), 0))[0]
    x1 = by[1_000_000][1] / by[1_000_000][0] if 1_000_000 in by else float("nan")
    print(f"planner: n100M_native_s {s100:.2f} speedup_1M {x1:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Summarise the packing plan of a whole data set: micro-batches, packing efficiency, rank balance.

    python -m fastross.data.packing_report SHARDS --max-tokens 16384 --ranks 64 --global-batch 128 \\
        [--epoch 0] [--seed 0] [--no-shuffle] [--attn-tokens 32500] [--threads 2]

Uses the shards' length index (`lengths.npy`, built natively when missing), the same epoch order
and the same planner as training (the native twin when built), so the figures are the ones a
run on this data with these settings will see.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from fastross.data import packing_planner
from fastross.data.index import build
from fastross.data.progress import progress
from fastross.data.schema import LENGTHS_FILE, read_lengths
from fastross.data.stream import epoch_order


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="folder of MDS shards from fastross.data.convert")
    p.add_argument("--max-tokens", type=int, required=True, help="tokens per micro-batch (data.max_tokens)")
    p.add_argument("--ranks", type=int, required=True, help="data-parallel ranks")
    p.add_argument("--global-batch", type=int, required=True, help="samples per optimizer step (data.global_batch)")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="data.seed")
    p.add_argument("--no-shuffle", action="store_true", help="data.shuffle=false")
    p.add_argument(
        "--attn-tokens",
        type=float,
        default=packing_planner.attention_cost_tokens(6.53e9, 28, 3584),
        help="the planner's attention cost scale (default: Qwen2-7B's)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)

    path = Path(a.shards) / LENGTHS_FILE
    if not path.exists():
        print(f"plan: {path} is missing; building it")
        build(a.shards)
    lengths = read_lengths(a.shards).astype(np.int64)  # verified against the folder's manifest
    t0 = time.perf_counter()
    order = epoch_order(len(lengths), a.seed, a.epoch, not a.no_shuffle)
    ordered = lengths[order]
    steps = len(ordered) // a.global_batch
    if steps == 0:
        print(f"plan: error: {len(lengths)} samples is fewer than --global-batch {a.global_batch}", file=sys.stderr)
        return 2
    chunk = max(1, min(steps, 1 << 16))
    parts = []
    with progress(total=steps, desc="plan", unit="step") as bar:
        for first in range(0, steps, chunk):
            last = min(steps, first + chunk)
            part = ordered[first * a.global_batch : last * a.global_batch]
            parts.append(
                packing_planner.plan_epoch(part, a.global_batch, a.ranks, a.max_tokens, a.attn_tokens, a.threads)
            )
            bar.update(last - first)
    mbs = np.concatenate([x.micro_batches for x in parts])
    imb = np.concatenate([x.imbalance for x in parts])
    tokens = sum(int(x.tokens.sum()) for x in parts)
    slots = sum(int(x.slots.sum()) for x in parts)
    wall = time.perf_counter() - t0
    dropped = len(lengths) - steps * a.global_batch
    print(
        f"plan: {len(lengths)} samples, {int(lengths.sum())} tokens, {steps} steps of {a.global_batch} "
        f"({dropped} left over), {a.ranks} ranks, max_tokens {a.max_tokens}, "
        f"planner {'native' if packing_planner.NATIVE is not None else 'python'} in {wall:.2f} s"
    )
    print(
        f"  micro-batches per rank per step: mean {mbs.mean():.2f}, max {mbs.max()}; total {int(mbs.sum()) * a.ranks}"
    )
    print(f"  packing efficiency (real tokens / computed slots): {tokens / slots:.4f}")
    print(
        f"  rank imbalance (max / mean compute): mean {imb.mean():.4f}, p99 {np.percentile(imb, 99):.4f}, "
        f"max {imb.max():.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

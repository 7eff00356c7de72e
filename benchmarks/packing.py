"""Packing benchmark: token efficiency of fastross's packing against padded batches, and rank balance.

    python benchmarks/packing.py [--steps 200] [--ranks 8] [--global-batch 128] [--max-tokens 16384]

Simulates the 7B instruction-tuning recipe on the CPU (no model runs): each step draws a global
batch from the stated default stage-2 mix (fastross/data/default_mix.py), and three strategies turn it into
micro-batches:

- fastross: fastross.data.packing_planner.plan_step, the planner the trainer uses: samples assigned to
  ranks by estimated compute, packed into varlen micro-batches of <= max_tokens tokens; a
  micro-batch without an image (including the empty ones a rank with less work runs) computes
  a weight-0 dummy image sample of 729 tokens, counted here as wasted slots.
- padded:   the reference recipe: each rank takes its share of the batch in order and runs
  micro-batches of 4 samples padded to the longest.
- grouped:  the same after LLaVA's length-grouped sampling: megabatches of ranks x 4 samples,
  image and text-only samples grouped apart, sorted by length, split into even chunks per rank.

E (efficiency) = real tokens / computed token slots, where a padded micro-batch computes
4 x its longest sample and a packed one its own tokens. I (imbalance) = mean over steps of
(max rank compute / mean rank compute), compute = tokens + attention term as in the planner.
Ends with `packing: efficiency E padded P grouped G imbalance I`; --save appends a CSV row to
benchmarks/results/packing.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from fastross.data import packing_planner
from fastross.data.default_mix import QWEN2_7B, VISUAL, draw
from fastross.data.packing_planner import attention_cost_tokens, plan_step, sample_cost

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: devtools/ is never installed
from devtools import results as R  # noqa: E402


def padded_slots(micro_batches: list[list[int]], lengths) -> int:
    return sum(len(mb) * max(lengths[i] for i in mb) for mb in micro_batches if mb)


def imbalance(rank_items: list[list[int]], lengths, attn: float) -> float:
    cost = [sum(sample_cost(int(lengths[i]), attn) for i in items) for items in rank_items]
    return max(cost) / (sum(cost) / len(cost))


def padded_step(lengths, ranks: int, mb: int):
    per = len(lengths) // ranks
    rank_items = [list(range(r * per, (r + 1) * per)) for r in range(ranks)]
    mbs = [items[j : j + mb] for items in rank_items for j in range(0, len(items), mb)]
    return padded_slots(mbs, lengths), rank_items


def grouped_step(lengths, image, ranks: int, mb: int, rng):
    """LLaVA's group_by_modality_length: modality-pure megabatches, sorted, split evenly."""
    mega = ranks * mb
    order = []
    for modality in (True, False):
        idx = rng.permutation(np.flatnonzero(image == modality)).tolist()
        order += [idx[j : j + mega] for j in range(0, len(idx), mega)]
    rank_items = [[] for _ in range(ranks)]
    mbs = []
    for megabatch in order:
        megabatch = sorted(megabatch, key=lambda i: -lengths[i])
        chunks, totals = [[] for _ in range(ranks)], [0] * ranks
        for i in megabatch:  # split_to_even_chunks: longest first to the lightest chunk with room
            r = min(
                (r for r in range(ranks) if len(chunks[r]) < max(1, len(megabatch) // ranks)),
                key=lambda r: totals[r],
                default=int(np.argmin(totals)),
            )
            chunks[r].append(i)
            totals[r] += lengths[i]
        for r, c in enumerate(chunks):
            rank_items[r] += c
            mbs += [c[j : j + mb] for j in range(0, len(c), mb)]
    return padded_slots(mbs, lengths), rank_items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--micro-batch", type=int, default=4, help="samples per padded micro-batch (reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", action="store_true", help="append a row to benchmarks/results/packing.csv")
    a = p.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    attn = attention_cost_tokens(**QWEN2_7B)

    real = packed = pad = grp = 0
    imb_f, imb_p, imb_g, mbs_f, plan_s = [], [], [], [], 0.0
    for _ in range(a.steps):
        lengths, image = draw(rng, a.global_batch)
        real += int(lengths.sum())
        t0 = time.perf_counter()
        plan = plan_step(lengths.tolist(), a.ranks, a.max_tokens, attn)
        plan_s += time.perf_counter() - t0
        # A micro-batch without an image (an empty one included) carries a weight-0 dummy image
        # sample of VISUAL tokens (fastross.data.batch.Collator): count it as computed slots.
        packed += sum(
            sum(int(lengths[i]) for i in mb) + (0 if any(image[i] for i in mb) else VISUAL)
            for r in plan.micro_batches
            for mb in r
        )
        imb_f.append(plan.imbalance())
        mbs_f.append(plan.num_micro_batches)
        s, items = padded_step(lengths, a.ranks, a.micro_batch)
        pad += s
        imb_p.append(imbalance(items, lengths, attn))
        s, items = grouped_step(lengths, image, a.ranks, a.micro_batch, rng)
        grp += s
        imb_g.append(imbalance(items, lengths, attn))

    e, pp, g, i = real / packed, real / pad, real / grp, float(np.mean(imb_f))
    print(
        f"{a.steps} steps, {a.ranks} ranks, global batch {a.global_batch}, max_tokens {a.max_tokens}, "
        f"mean sample {real / a.steps / a.global_batch:.0f} tokens"
    )
    print(f"{'strategy':<10} {'efficiency':>10} {'rank imbalance':>15} {'micro-batches/rank':>19}")
    print(f"{'fastross':<10} {e:>10.4f} {i:>15.4f} {np.mean(mbs_f):>19.2f}")
    print(f"{'padded':<10} {pp:>10.4f} {np.mean(imb_p):>15.4f} {a.global_batch / a.ranks / a.micro_batch:>19.2f}")
    print(f"{'grouped':<10} {g:>10.4f} {np.mean(imb_g):>15.4f} {a.global_batch / a.ranks / a.micro_batch:>19.2f}")
    impl = "native" if packing_planner.NATIVE is not None else "plain Python"
    print(f"planner: {plan_s / a.steps * 1e3:.3f} ms per step ({impl})")
    if a.save:
        out = R.append_csv(
            "packing.csv",
            [
                "date",
                "commit",
                "device",
                "steps",
                "ranks",
                "global_batch",
                "max_tokens",
                "efficiency",
                "padded",
                "grouped",
                "imbalance",
                "padded_imbalance",
                "grouped_imbalance",
            ],
            [
                [
                    R.today(),
                    R.commit(),
                    "cpu (simulation)",
                    a.steps,
                    a.ranks,
                    a.global_batch,
                    a.max_tokens,
                    f"{e:.4f}",
                    f"{pp:.4f}",
                    f"{g:.4f}",
                    f"{i:.4f}",
                    f"{np.mean(imb_p):.4f}",
                    f"{np.mean(imb_g):.4f}",
                ]
            ],
        )
        print(f"appended to {out}")
    print(f"packing: efficiency {e:.4f} padded {pp:.4f} grouped {g:.4f} imbalance {i:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

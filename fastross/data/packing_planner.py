"""Plan one optimizer step: assign the global batch's samples to ranks and pack micro-batches.

`plan_step_ref` is the plain-Python reference. `plan_step` and `plan_epoch` use the native twin
(fastross._native, built from native/ by CMakeLists.txt) when it is importable, which gives
identical plans (tests/test_planner_native.py), and fall back to the reference otherwise.

Cost model: a sample of L tokens (visual tokens included) costs L + L^2 / attn_tokens, the
linear layers' work plus its causal attention over its own length; attn_tokens is the
length at which the two are equal (about 32k for Qwen2-7B: see `attention_cost_tokens`).

1. Ranks: longest-processing-time-first. Samples in decreasing cost (ties by position) go to
   the rank with the least cost so far (ties to the lowest rank). Ranks take different
   numbers of samples; their costs end up within a small fraction of each other.
2. Micro-batches: on each rank, first-fit decreasing by length into bins of at most
   `max_tokens` tokens; a sample longer than `max_tokens` gets a bin of its own.
3. Every rank runs the same number of micro-batches (FSDP's collectives must line up): a
   rank with fewer bins runs empty micro-batches that contribute nothing.

Everything depends only on (lengths, ranks, max_tokens, attn_tokens), so every rank computes
the same plan without communicating, and a resumed run re-plans a step exactly.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass
class StepPlan:
    micro_batches: list[list[list[int]]]  # [rank][micro-batch] -> positions in the step's sample list
    costs: list[float]  # estimated cost per rank

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches[0]) if self.micro_batches else 0

    def imbalance(self) -> float:
        mean = sum(self.costs) / len(self.costs)
        return max(self.costs) / mean if mean > 0 else 1.0


def attention_cost_tokens(non_embedding_params: float, layers: int, hidden: int) -> float:
    """The sample length whose attention FLOPs (12 * layers * hidden * L per token) equal its
    linear FLOPs (6 * params per token): cost(L) = L + L^2 / attn_tokens."""
    return 6.0 * non_embedding_params / (12.0 * layers * hidden)


def sample_cost(length: int, attn_tokens: float) -> float:
    return length + length * length / attn_tokens


def plan_step_ref(lengths: list[int], ranks: int, max_tokens: int, attn_tokens: float) -> StepPlan:
    if ranks < 1 or max_tokens < 1:
        raise ValueError(f"ranks={ranks} and max_tokens={max_tokens} must be >= 1")
    costs = [sample_cost(n, attn_tokens) for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: (-costs[i], i))
    heap = [(0.0, r) for r in range(ranks)]
    assigned: list[list[int]] = [[] for _ in range(ranks)]
    for i in order:
        load, r = heapq.heappop(heap)
        assigned[r].append(i)
        heapq.heappush(heap, (load + costs[i], r))
    rank_cost = [0.0] * ranks
    for load, r in heap:
        rank_cost[r] = load

    plans = []
    for items in assigned:  # already in decreasing cost, hence decreasing length
        bins: list[list[int]] = []
        room: list[int] = []
        for i in items:
            n = lengths[i]
            for b, free in enumerate(room):
                if n <= free:
                    bins[b].append(i)
                    room[b] -= n
                    break
            else:
                bins.append([i])
                room.append(max(max_tokens - n, 0))
        plans.append(bins)
    m = max((len(b) for b in plans), default=0)
    for bins in plans:
        bins.extend([] for _ in range(m - len(bins)))
    return StepPlan(micro_batches=plans, costs=rank_cost)


try:  # the native twin; absent only when the package was not built (e.g. run from a bare checkout)
    from fastross import _native
except ImportError:  # pragma: no cover - exercised by the fallback test through NATIVE = None
    _native = None
NATIVE = _native


def plan_step(lengths, ranks: int, max_tokens: int, attn_tokens: float) -> StepPlan:
    if NATIVE is None:
        return plan_step_ref(np.asarray(lengths, dtype=np.int64).tolist(), ranks, max_tokens, attn_tokens)
    if ranks < 1 or max_tokens < 1:
        raise ValueError(f"ranks={ranks} and max_tokens={max_tokens} must be >= 1")
    bins, costs = NATIVE.plan_step(np.asarray(lengths, dtype=np.int64), ranks, max_tokens, attn_tokens)
    return StepPlan(micro_batches=bins, costs=costs)


def plan_padded_step(lengths, ranks: int, samples: int, attn_tokens: float) -> StepPlan:
    """The reference recipe's split (data.packing=padded): rank r takes the r-th contiguous share of the step's
    samples in order, in micro-batches of `samples`; each sample costs as if it were as long as the longest of its
    micro-batch, to which it is padded."""
    n = len(lengths)
    if ranks < 1 or samples < 1 or n % ranks:
        raise ValueError(
            f"padded micro-batches need data.global_batch ({n}) divisible by the ranks ({ranks}) "
            f"and data.padded_samples ({samples}) >= 1"
        )
    per = n // ranks
    bins = [
        [list(range(r * per + j, r * per + min(j + samples, per))) for j in range(0, per, samples)]
        for r in range(ranks)
    ]
    costs = [sum(len(mb) * sample_cost(max(int(lengths[i]) for i in mb), attn_tokens) for mb in rank) for rank in bins]
    return StepPlan(micro_batches=bins, costs=costs)


@dataclass
class EpochSummary:
    micro_batches: np.ndarray  # (steps,) micro-batches per rank
    imbalance: np.ndarray  # (steps,) max rank cost / mean rank cost
    tokens: np.ndarray  # (steps,) real tokens
    slots: np.ndarray  # (steps,) computed token slots (an empty micro-batch counts 1)


def plan_epoch_ref(lengths: np.ndarray, global_batch: int, ranks: int, max_tokens: int, attn_tokens: float):
    steps = len(lengths) // global_batch
    out = EpochSummary(np.zeros(steps, np.int32), np.ones(steps), np.zeros(steps, np.int64), np.zeros(steps, np.int64))
    for k in range(steps):
        step = lengths[k * global_batch : (k + 1) * global_batch].tolist()
        plan = plan_step_ref(step, ranks, max_tokens, attn_tokens)
        sizes = [sum(step[i] for i in mb) for mbs in plan.micro_batches for mb in mbs]
        out.micro_batches[k] = plan.num_micro_batches
        out.imbalance[k] = plan.imbalance()
        out.tokens[k] = sum(sizes)
        out.slots[k] = sum(max(n, 1) for n in sizes)
    return out


def plan_epoch(
    lengths: np.ndarray, global_batch: int, ranks: int, max_tokens: int, attn_tokens: float, threads: int = 1
) -> EpochSummary:
    """Plan every global batch of `lengths` (already in epoch order); per-step summaries only."""
    if NATIVE is None:
        return plan_epoch_ref(lengths, global_batch, ranks, max_tokens, attn_tokens)
    d = NATIVE.plan_epoch(np.asarray(lengths, dtype=np.int64), global_batch, ranks, max_tokens, attn_tokens, threads)
    return EpochSummary(d["micro_batches"], d["imbalance"], d["tokens"], d["slots"])

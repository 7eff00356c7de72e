"""Plan one optimizer step: assign the global batch's samples to ranks and pack micro-batches.

The plain-Python reference planner (a native twin may replace it; plans must stay identical).

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


def plan_step(lengths: list[int], ranks: int, max_tokens: int, attn_tokens: float) -> StepPlan:
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

// The packing planner's native twin (reference: fastross/data/packing_planner.py, which documents the
// algorithm). Plans must be identical to the reference, so each step mirrors it exactly: the
// order (cost descending, position ascending), the least-loaded-rank rule (ties to the lowest
// rank, costs summed in the same order in double precision), first-fit decreasing bins, and
// empty micro-batches to equalise counts.
//
// Speed: one pass over the sorted samples assigns each to its rank and, at once, first-fits it
// into that rank's bins (a rank's samples arrive in the same decreasing order the reference
// packs them in). The sort is on packed 64-bit keys (length descending, position ascending):
// cost = L + L^2/attn is strictly increasing in L for L < 2^26, so this is the reference's
// order; a stable LSD radix sort does it in a few passes. Longer samples fall back to
// comparing costs. Workspaces are reused across steps, and
// plan_epoch keeps only per-step summaries, spread over threads.
#include "planner.h"

#include <algorithm>
#include <thread>

namespace fastross {

namespace {
constexpr int64_t kKeyedMaxLength = int64_t(1) << 26;
}

void plan_step_flat(const int64_t* lengths, int64_t n, int ranks, int64_t max_tokens, double attn,
                    Workspace& ws) {
  ws.cost.resize(n);
  ws.order.resize(n);
  ws.rank_of.resize(n);
  ws.bin_of.resize(n);
  bool keyed = true;
  for (int64_t i = 0; i < n; ++i) {
    const double l = static_cast<double>(lengths[i]);
    ws.cost[i] = l + l * l / attn;
    keyed = keyed && lengths[i] >= 0 && lengths[i] < kKeyedMaxLength && i < (int64_t(1) << 32);
  }
  if (keyed) {
    // LSD radix sort of (longest - length), 8 bits a pass, only as many passes as the longest
    // sample needs: stable, so equal lengths keep ascending positions.
    int64_t longest = 0;
    for (int64_t i = 0; i < n; ++i) longest = std::max(longest, lengths[i]);
    ws.keys.resize(n);
    ws.tmp.resize(n);
    for (int64_t i = 0; i < n; ++i) ws.keys[i] = (uint64_t(longest - lengths[i]) << 32) | uint64_t(i);
    for (int shift = 0; (longest >> shift) != 0; shift += 8) {
      uint32_t count[257] = {0};
      for (int64_t i = 0; i < n; ++i) ++count[((ws.keys[i] >> (32 + shift)) & 0xFF) + 1];
      for (int d = 0; d < 256; ++d) count[d + 1] += count[d];
      for (int64_t i = 0; i < n; ++i) ws.tmp[count[(ws.keys[i] >> (32 + shift)) & 0xFF]++] = ws.keys[i];
      ws.keys.swap(ws.tmp);
    }
    for (int64_t k = 0; k < n; ++k) ws.order[k] = int64_t(ws.keys[k] & 0xFFFFFFFFu);
  } else {
    for (int64_t i = 0; i < n; ++i) ws.order[i] = i;
    std::sort(ws.order.begin(), ws.order.end(), [&](int64_t a, int64_t b) {
      return ws.cost[a] != ws.cost[b] ? ws.cost[a] > ws.cost[b] : a < b;
    });
  }
  ws.costs.assign(ranks, 0.0);
  ws.rooms.resize(ranks);
  ws.used.resize(ranks);
  for (int r = 0; r < ranks; ++r) {
    ws.rooms[r].clear();
    ws.used[r].clear();
  }
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = ws.order[k];
    int best = 0;
    for (int r = 1; r < ranks; ++r)
      if (ws.costs[r] < ws.costs[best]) best = r;
    ws.costs[best] += ws.cost[i];
    ws.rank_of[i] = best;
    auto& room = ws.rooms[best];
    const int64_t len = lengths[i];
    size_t b = 0;
    while (b < room.size() && len > room[b]) ++b;
    if (b == room.size()) {
      room.push_back(std::max<int64_t>(max_tokens - len, 0));
      ws.used[best].push_back(len);
    } else {
      room[b] -= len;
      ws.used[best][b] += len;
    }
    ws.bin_of[i] = static_cast<int32_t>(b);
  }
  ws.num_bins = 0;
  for (const auto& room : ws.rooms) ws.num_bins = std::max(ws.num_bins, room.size());
}

void plan_step(const int64_t* lengths, int64_t n, int ranks, int64_t max_tokens, double attn, Workspace& ws,
               StepPlan& out) {
  plan_step_flat(lengths, n, ranks, max_tokens, attn, ws);
  out.costs = ws.costs;
  out.bins.assign(ranks, std::vector<std::vector<int64_t>>(ws.num_bins));
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = ws.order[k];
    out.bins[ws.rank_of[i]][ws.bin_of[i]].push_back(i);
  }
}

EpochSummary plan_epoch(const int64_t* lengths, int64_t n, int64_t global_batch, int ranks, int64_t max_tokens,
                        double attn, int threads) {
  const int64_t steps = global_batch > 0 ? n / global_batch : 0;
  EpochSummary s;
  s.micro_batches.assign(steps, 0);
  s.imbalance.assign(steps, 1.0);
  s.tokens.assign(steps, 0);
  s.slots.assign(steps, 0);
  auto work = [&](int64_t first, int64_t last) {
    Workspace ws;
    for (int64_t k = first; k < last; ++k) {
      const int64_t* l = lengths + k * global_batch;
      plan_step_flat(l, global_batch, ranks, max_tokens, attn, ws);
      int64_t tokens = 0, slots = 0;
      for (const auto& used : ws.used) {
        for (int64_t t : used) {
          tokens += t;
          slots += std::max<int64_t>(t, 1);
        }
        slots += int64_t(ws.num_bins - used.size());  // an empty micro-batch still computes its filler
      }
      double total = 0, worst = 0;
      for (double c : ws.costs) {
        total += c;
        worst = std::max(worst, c);
      }
      s.micro_batches[k] = static_cast<int32_t>(ws.num_bins);
      s.imbalance[k] = total > 0 ? worst / (total / ranks) : 1.0;
      s.tokens[k] = tokens;
      s.slots[k] = slots;
    }
  };
  threads = std::max(1, std::min<int>(threads, static_cast<int>(std::max<int64_t>(steps / 64, 1))));
  std::vector<std::thread> pool;
  const int64_t chunk = (steps + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t a = t * chunk, b = std::min(steps, a + chunk);
    if (a < b) pool.emplace_back(work, a, b);
  }
  for (auto& th : pool) th.join();
  return s;
}

}  // namespace fastross

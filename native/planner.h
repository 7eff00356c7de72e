// Native packing planner and length-index builder (see planner.cpp, index.cpp).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace fastross {

struct Workspace {  // reused across steps: no allocation in the steady state
  std::vector<double> cost;                 // per sample
  std::vector<uint64_t> keys, tmp;          // packed sort keys and the radix sort's buffer
  std::vector<int64_t> order;               // samples by cost, descending
  std::vector<int32_t> rank_of, bin_of;     // per sample: its rank and micro-batch
  std::vector<std::vector<int64_t>> rooms;  // per rank: free tokens of each micro-batch
  std::vector<double> costs;                // per rank
  std::vector<std::vector<int64_t>> used;   // per rank: tokens in each micro-batch
  size_t num_bins = 0;                      // micro-batches per rank
};

struct StepPlan {
  std::vector<std::vector<std::vector<int64_t>>> bins;  // [rank][micro-batch] -> positions
  std::vector<double> costs;                            // [rank] estimated cost
};

struct EpochSummary {
  std::vector<int32_t> micro_batches;  // per step, per rank (equal on all ranks)
  std::vector<double> imbalance;       // per step: max rank cost / mean rank cost
  std::vector<int64_t> tokens;         // per step: real tokens
  std::vector<int64_t> slots;          // per step: computed token slots (empty micro-batches count 1)
};

void plan_step_flat(const int64_t* lengths, int64_t n, int ranks, int64_t max_tokens, double attn, Workspace& ws);
void plan_step(const int64_t* lengths, int64_t n, int ranks, int64_t max_tokens, double attn, Workspace& ws,
               StepPlan& out);
EpochSummary plan_epoch(const int64_t* lengths, int64_t n, int64_t global_batch, int ranks, int64_t max_tokens,
                        double attn, int threads);

// Reads one 8-byte integer column from uncompressed MDS shard files, in sample order.
// A sample is: uint32 sizes of its num_var variable-size columns, then every column's bytes in
// column order; the target column follows num_var_before variable-size columns and
// fixed_before bytes of fixed-size ones.
std::vector<int64_t> read_mds_int_column(const std::vector<std::string>& shard_files, int num_var,
                                         int num_var_before, int64_t fixed_before);

}  // namespace fastross

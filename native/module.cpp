// Python bindings of the native planner and index builder: fastross._native.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "planner.h"

namespace py = pybind11;
using fastross::EpochSummary;
using fastross::StepPlan;
using fastross::Workspace;

static py::tuple plan_step(py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths, int ranks,
                           int64_t max_tokens, double attn) {
  if (ranks < 1 || max_tokens < 1) throw std::invalid_argument("ranks and max_tokens must be >= 1");
  Workspace ws;
  StepPlan plan;
  {
    py::gil_scoped_release release;
    fastross::plan_step(lengths.data(), lengths.size(), ranks, max_tokens, attn, ws, plan);
  }
  return py::make_tuple(py::cast(plan.bins), py::cast(plan.costs));
}

static py::dict plan_epoch(py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths,
                           int64_t global_batch, int ranks, int64_t max_tokens, double attn, int threads) {
  if (ranks < 1 || max_tokens < 1 || global_batch < 1)
    throw std::invalid_argument("global_batch, ranks and max_tokens must be >= 1");
  EpochSummary s;
  {
    py::gil_scoped_release release;
    s = fastross::plan_epoch(lengths.data(), lengths.size(), global_batch, ranks, max_tokens, attn, threads);
  }
  py::dict d;
  d["micro_batches"] = py::array_t<int32_t>(s.micro_batches.size(), s.micro_batches.data());
  d["imbalance"] = py::array_t<double>(s.imbalance.size(), s.imbalance.data());
  d["tokens"] = py::array_t<int64_t>(s.tokens.size(), s.tokens.data());
  d["slots"] = py::array_t<int64_t>(s.slots.size(), s.slots.data());
  return d;
}

static py::array_t<int64_t> read_mds_int_column(const std::vector<std::string>& files, int num_var,
                                                int num_var_before, int64_t fixed_before) {
  std::vector<int64_t> v;
  {
    py::gil_scoped_release release;
    v = fastross::read_mds_int_column(files, num_var, num_var_before, fixed_before);
  }
  return py::array_t<int64_t>(v.size(), v.data());
}

PYBIND11_MODULE(_native, m) {
  m.doc() = "fastross native helpers: the packing planner and the MDS length-index builder";
  m.def("plan_step", &plan_step, py::arg("lengths"), py::arg("ranks"), py::arg("max_tokens"), py::arg("attn_tokens"),
        "Plan one step: ([rank][micro-batch] -> positions, per-rank costs); identical to the Python reference.");
  m.def("plan_epoch", &plan_epoch, py::arg("lengths"), py::arg("global_batch"), py::arg("ranks"),
        py::arg("max_tokens"), py::arg("attn_tokens"), py::arg("threads") = 1,
        "Plan every global batch of lengths (in epoch order); per-step summaries as numpy arrays.");
  m.def("read_mds_int_column", &read_mds_int_column, py::arg("files"), py::arg("num_var"),
        py::arg("num_var_before"), py::arg("fixed_before"), "Read an 8-byte int column of uncompressed MDS shards.");
}

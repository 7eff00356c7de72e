"""The native planner (fastross._native, built by CMakeLists.txt) gives the reference's plans exactly."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fastross import _native as native  # built by `pip install -e .` (make test): its absence is a failure
from fastross.data import packing_planner


def native_plan(lengths, ranks, max_tokens, attn):
    bins, costs = native.plan_step(np.asarray(lengths, dtype=np.int64), ranks, max_tokens, attn)
    return packing_planner.StepPlan(micro_batches=bins, costs=costs)


@settings(max_examples=400, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 20000), max_size=200),
    ranks=st.integers(1, 12),
    max_tokens=st.integers(1, 40000),
    attn=st.sampled_from([1.0, 977.5, 32500.0, 1e12]),
)
def test_native_equals_reference(lengths, ranks, max_tokens, attn):
    reference = packing_planner.plan_step_ref(lengths, ranks, max_tokens, attn)
    assert native_plan(lengths, ranks, max_tokens, attn) == reference


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.sampled_from([1, 7, 729, 730, 16384, 70_000_000]), max_size=64), ranks=st.integers(1, 5))
def test_native_equals_reference_with_ties_and_huge_samples(lengths, ranks):
    # 70M tokens exceeds the radix-keyed range: the native planner falls back to comparing costs
    assert native_plan(lengths, ranks, 20000, 3e4) == packing_planner.plan_step_ref(lengths, ranks, 20000, 3e4)


@pytest.mark.parametrize(
    "lengths, ranks",
    [([], 3), ([5000], 2), ([100] * 50, 4), ([0, 0, 0], 2), ([1] * 7, 8)],
    ids=["empty", "one-over-budget", "all-equal", "zero-length", "fewer-samples-than-ranks"],
)
def test_edge_cases(lengths, ranks):
    assert native_plan(lengths, ranks, 1000, 3e4) == packing_planner.plan_step_ref(lengths, ranks, 1000, 3e4)


def test_epoch_summaries_identical():
    rng = np.random.default_rng(3)
    lengths = np.where(rng.random(20000) < 0.2, rng.integers(20, 9000, 20000), 729 + rng.integers(10, 900, 20000))
    for threads in (1, 2, 5):
        a = packing_planner.plan_epoch(lengths, 96, 6, 8192, 3e4, threads=threads)
        b = packing_planner.plan_epoch_ref(lengths, 96, 6, 8192, 3e4)
        for field in ("micro_batches", "imbalance", "tokens", "slots"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert a.tokens.sum() == lengths[: len(a.tokens) * 96].sum()


def test_python_fallback_when_native_absent(monkeypatch):
    monkeypatch.setattr(packing_planner, "NATIVE", None)
    p = packing_planner.plan_step(np.array([3, 9, 4]), 2, 10, 100.0)
    assert p == packing_planner.plan_step_ref([3, 9, 4], 2, 10, 100.0)


def test_native_index_equals_decoded_lengths(stage2_shards, tmp_path):
    import shutil

    from fastross.data import index
    from fastross.data.schema import LENGTHS_FILE

    copy = tmp_path / "shards"
    shutil.copytree(stage2_shards, copy)
    (copy / LENGTHS_FILE).unlink()
    assert index.native_layout(copy) is not None  # uncompressed MDS: the native reader is used
    built = index.build(copy)
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(copy), shuffle=False, batch_size=1)
    assert built.tolist() == [ds[i]["length"] for i in range(ds.num_samples)]
    assert built.tolist() == np.load(stage2_shards / LENGTHS_FILE).tolist()

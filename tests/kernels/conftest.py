"""The `check` fixture: a kernel and every gradient against its reference (kernel_checks.py)."""

import os

import pytest

# Small interpreter tiles (2^14 elements: 128 x 128 x 64 matmul tiles, row-wise tiles of <= 64 rows) so that the
# tests' odd shapes cross tile edges in every direction, as they do on a GPU; training under the interpreter takes 2^20
# (fastross/kernels/_common.py). Read at each launch, so setting it here, before any test runs, is enough.
os.environ.setdefault("FASTROSS_INTERPRET_ELEMENTS", str(1 << 14))

from kernel_checks import check_against_ref


@pytest.fixture
def check():
    return check_against_ref


@pytest.fixture
def training_tiles(monkeypatch):
    """Training's interpreter tiles (the default budget) for a test that trains, its torchrun workers included."""
    monkeypatch.delenv("FASTROSS_INTERPRET_ELEMENTS")

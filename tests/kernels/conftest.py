"""The `check` fixture: a kernel and every gradient against its reference (kernel_checks.py)."""

import pytest

from kernel_checks import check_against_ref


@pytest.fixture
def check():
    return check_against_ref

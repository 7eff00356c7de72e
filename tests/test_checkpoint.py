"""Checkpoints: RNG files are read as tensors only."""

import pickle
from pathlib import Path

import pytest
import torch

from fastross import checkpoint
from fastross.checkpoint import load_rng


# ---------------------------------------------------------------- RNG files


class _RunsCode:
    """Unpickling this calls exec(): what a crafted rng_rank0.pt could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_crafted_rng_file_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    crafted = tmp_path / "rng_rank0.pt"
    torch.save({"torch": _RunsCode(marker)}, crafted)
    with pytest.raises(pickle.UnpicklingError, match="rng_rank0.pt: refused to load"):
        load_rng(crafted)
    assert not marker.exists()
    torch.load(crafted, weights_only=False)  # the file really is dangerous: the old way ran it
    assert marker.read_text() == "pwned"

    genuine = tmp_path / "rng_rank1.pt"
    torch.manual_seed(3)
    torch.save(checkpoint.rng_state(), genuine)
    want = torch.rand(5)
    torch.manual_seed(4)
    checkpoint.set_rng_state(load_rng(genuine))
    assert torch.equal(torch.rand(5), want)

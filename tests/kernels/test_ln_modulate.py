"""LayerNorm (no affine) + adaLN modulation against F.layer_norm * (1 + scale) + shift."""

import pytest
import torch
from fastross.kernels.ln_modulate import ln_modulate, ln_modulate_ref

SHAPES = [(37, 48), (3, 7, 100), (2, 130, 33)]  # rows and widths that are not multiples of the blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_ln_modulate_matches_reference(check, shape, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 3 + 1
    shift, scale = torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 0.5
    check(ln_modulate, ln_modulate_ref, [x, shift, scale], [True, True, True], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ln_modulate_reads_adaln_chunks_as_views(check, dtype):
    """shift and scale as chunks of one (.., 6W) projection output: strided rows, grads through the split."""
    g = torch.Generator().manual_seed(2)
    x, ada = torch.randn(2, 9, 40, generator=g), torch.randn(2, 9, 240, generator=g)

    def prep(leaves):
        sh, sc = leaves[1].chunk(6, dim=-1)[3:5]
        assert sh.stride(1) == 240  # a view, not a copy
        return leaves[0], sh, sc

    check(ln_modulate, ln_modulate_ref, [x, ada], [True, True], dtype, prep=prep)

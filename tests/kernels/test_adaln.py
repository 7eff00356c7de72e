"""SiLU(condition embedding + timestep embedding), broadcast over replicas and tokens, against torch."""

import pytest
import torch
from fastross.kernels.adaln import silu_cond, silu_cond_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,r,tokens,w", [(2, 3, 11, 40), (1, 4, 50, 96)])
def test_silu_cond_matches_reference(check, n, r, tokens, w, dtype):
    g = torch.Generator().manual_seed(3)
    cc, te = torch.randn(n, tokens, w, generator=g) * 2, torch.randn(n, r, w, generator=g)
    check(silu_cond, silu_cond_ref, [cc, te], [True, True], dtype)

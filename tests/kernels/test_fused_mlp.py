"""The fused modulated MLP branch and the gated projection: output and every gradient against torch."""

import pytest
import torch
from fastross.kernels.fused_mlp import fused_mlp_branch, fused_mlp_branch_ref, gated_linear, gated_linear_ref


def mlp_inputs(rows, w, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, w, generator=g)
    ada = torch.randn(*rows, 3 * w, generator=g) * 0.5
    w1, b1 = torch.randn(hidden, w, generator=g) / w**0.5, torch.randn(hidden, generator=g) * 0.1
    w2, b2 = torch.randn(w, hidden, generator=g) / hidden**0.5, torch.randn(w, generator=g) * 0.1
    return [x, ada, w1, b1, w2, b2]


def chunks(leaves):  # shift, scale, gate as strided views of one adaLN output
    x, ada, *rest = leaves
    return [x, *ada.chunk(3, dim=-1), *rest]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act,rows,w,hidden", [("gelu_tanh", (3, 23), 40, 160), ("silu", (67,), 36, 36)])
def test_fused_mlp_branch_matches_reference(check, act, rows, w, hidden, dtype):
    fn = lambda *a: fused_mlp_branch(*a, act=act)  # noqa: E731
    ref = lambda *a: fused_mlp_branch_ref(*a, act=act)  # noqa: E731
    check(fn, ref, mlp_inputs(rows, w, hidden, seed=4), [True] * 6, dtype, prep=chunks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_linear_matches_reference(check, dtype):
    g = torch.Generator().manual_seed(5)
    y, res = torch.randn(2, 29, 40, generator=g), torch.randn(2, 29, 40, generator=g)
    w, b = torch.randn(40, 40, generator=g) / 40**0.5, torch.randn(40, generator=g)
    ada = torch.randn(2, 29, 120, generator=g)

    def prep(leaves):
        y, w, b, ada, res = leaves
        return y, w, b, ada.chunk(3, dim=-1)[2], res

    check(gated_linear, gated_linear_ref, [y, w, b, ada, res], [True] * 5, dtype, prep=prep)

"""The matmul with fused epilogues against eager PyTorch (forward outputs; backward is tested through fused_mlp)."""

import pytest
import torch
from fastross.kernels.linear_epilogue import gate_backward, linear_epilogue, linear_epilogue_ref

from kernel_checks import rel_err

M, K, N = 150, 100, 130  # several tiles each way (K too), none a multiple of the block sizes


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)  # an nn.Linear weight: passed as w.t()
    bias = torch.randn(N, generator=g).to(dtype)
    aux = torch.randn(M, N, generator=g).to(dtype)
    ada = torch.randn(M, 3 * N, generator=g).to(dtype)
    return a, w, bias, aux, ada[:, N : 2 * N]  # the gate is a strided chunk view


@pytest.mark.parametrize("epilogue", ["none", "bias_act", "gate_res", "act_grad"])
@pytest.mark.parametrize("act", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_epilogues_match_reference(epilogue, act, dtype):
    a, w, bias, aux, gate = inputs(dtype)
    kw = dict(
        epilogue=epilogue,
        act=act,
        bias=None if epilogue == "act_grad" else bias,
        aux=aux if epilogue in ("gate_res", "act_grad") else None,
        gate=gate if epilogue == "gate_res" else None,
    )
    got = linear_epilogue(a, w.t(), **kw)
    got = got if isinstance(got, tuple) else (got,)
    low = linear_epilogue_ref(a, w.t(), **kw)
    low = low if isinstance(low, tuple) else (low,)
    up = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    want = linear_epilogue_ref(a.float(), w.t().float(), **up)
    want = want if isinstance(want, tuple) else (want,)
    for x, lo, hi in zip(got, low, want):
        assert x.dtype == dtype and x.shape == hi.shape
        if dtype == torch.float32:
            assert rel_err(x, hi) <= 1e-5
        else:
            fused, torch_err = (x.float() - hi).abs().max(), (lo.float() - hi).abs().max()
            assert fused <= 2 * torch_err + 1e-3 * hi.abs().max()


def test_column_sums_are_the_bias_gradient():
    a, w, _, aux, _ = inputs(torch.float32, seed=1)
    dh, act, colsum = linear_epilogue(a, w.t(), epilogue="act_grad", aux=aux, col_sums=True)
    assert rel_err(colsum, dh.sum(0)) <= 1e-5
    dout, b = torch.randn(M, N), torch.randn(M, N)
    ada = torch.randn(M, 2 * N)
    db, dgate, dbias = gate_backward(dout, ada[:, N:], b)
    torch.testing.assert_close(db, dout * ada[:, N:], rtol=0, atol=0)
    torch.testing.assert_close(dgate, dout * b, rtol=0, atol=0)
    assert rel_err(dbias, db.sum(0)) <= 1e-5

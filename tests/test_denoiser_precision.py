"""model.denoiser.dtype: the denoiser's own FSDP2 MixedPrecisionPolicy, whatever train.dtype is.

The training-curve comparison (bf16 within the fp32 seed-to-seed band) is benchmarks/denoiser_precision.py;
here: the switch is declared once and applied, and the loss stays fp32 when the denoiser computes in bf16.
"""

import typing

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from fastross.config import ConfigError, DenoiserConfig, _check, choices
from fastross.model import diffusion
from fastross.model.denoiser import DTYPES, Denoiser, mp_policy


def test_dtype_is_one_literal_and_fp32_by_default():
    assert choices(DenoiserConfig, "dtype") == tuple(DTYPES) == ("fp32", "bf16")
    assert DenoiserConfig().dtype == "fp32"  # ROSS_SPEC.md section 7: fp32 until a run shows bf16 tracks it
    with pytest.raises(ConfigError, match="model.denoiser.dtype must be one of 'fp32', 'bf16', got 'fp16'"):
        _check("model.denoiser.dtype", "fp16", typing.get_type_hints(DenoiserConfig)["dtype"])
    with pytest.raises(ValueError, match="model.denoiser.dtype"):
        Denoiser("dit", 24, 40, 1, 4, 3, channels=20, dtype="fp16")


def test_policy_per_dtype():
    fp32, bf16 = mp_policy("fp32"), mp_policy("bf16")
    assert (fp32.param_dtype, fp32.reduce_dtype) == (None, torch.float32)
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_bf16_denoiser_under_fsdp2_computes_in_bf16_and_keeps_an_fp32_loss(world_of_one):
    """fully_shard with mp_policy("bf16"): eps_hat comes out bf16, the loss and the gradients are fp32, the
    stored parameters stay fp32; the loss is the fp32 denoiser's within bf16's rounding (2 % relative: ~8
    roundings of 2^-8 through 2 blocks, measured 0.3 %)."""
    g = torch.Generator().manual_seed(0)
    n, r, grid, c = 2, 4, 3, 5
    mean, std = torch.randn(n, c, 2 * grid, 2 * grid, generator=g), torch.rand(n, c, 2 * grid, 2 * grid, generator=g)
    keys = torch.tensor([3, 4], dtype=torch.int64)
    t = torch.randint(0, 1000, (n, r), generator=g)
    ab = diffusion.cosine_alphas_cumprod().float()
    cond = torch.randn(n, grid * grid, 24, generator=g)
    losses, outs = {}, {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(0)
        m = Denoiser("dit", 24, 40, 2, 4, grid, channels=4 * c, dtype=dtype)
        with torch.no_grad():  # open the adaLN-Zero gates so every path carries signal
            for p in m.parameters():
                if torch.count_nonzero(p) == 0:
                    p.normal_(0, 0.2)
        fully_shard(m, mesh=world_of_one, mp_policy=mp_policy(m.precision))
        m.register_forward_hook(lambda mod, i, o, d=dtype: outs.__setitem__(d, o.dtype))
        loss = diffusion.eps_loss_materialised(
            m, mean, std, keys, t, ab[t].sqrt(), (1 - ab[t]).sqrt(), cond, 0.1159, 0.3611
        )
        loss.sum().backward()
        losses[dtype] = loss.detach()
        assert loss.dtype == torch.float32
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in m.parameters())
    assert outs == {"fp32": torch.float32, "bf16": torch.bfloat16}
    assert not torch.equal(losses["bf16"], losses["fp32"])  # the switch changed the compute
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=2e-2, atol=0)


@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_sharded_denoiser_returns_no_view_so_fsdp2_does_not_warn(world_of_one, kind):
    """FSDP2 hooks the denoiser's output for its backward and warns ("returned a view tensor") when that output is a
    view, at every step of every run. The denoiser returns flat rows from one addmm: no view, no warning (the numbers
    are the 3-D Linear's, bit for bit: tests/kernels/test_denoiser_impl.py's eager forward)."""
    import warnings

    torch.manual_seed(0)
    m = Denoiser(kind, 24, 40, 2, 4, 3, channels=20)
    with torch.no_grad():
        for p in m.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(1)
    x, t, cond = (
        torch.randn(2, 4, 9, 20, generator=g),
        torch.randint(0, 1000, (2, 4), generator=g),
        torch.randn(2, 9, 24, generator=g),
    )
    with torch.no_grad():
        want = m(x, t, cond)
    fully_shard(m, mesh=world_of_one, mp_policy=mp_policy(m.precision))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = m(x, t, cond)
        out.float().pow(2).sum().backward()
    assert [str(w.message) for w in seen if "view" in str(w.message)] == []
    assert out._base is None and out.shape == (2 * 4 * 9, 20)
    assert torch.equal(out.detach(), want)  # sharding over one rank changes nothing

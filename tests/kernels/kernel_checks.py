"""Checks shared by the kernel tests: a kernel and every gradient against its plain-torch reference.

Imported as `kernel_checks` (pytest puts this folder on sys.path); conftest.py offers `check` as a fixture.

fp32: the norm-wise relative error max|got - ref| / max|ref| is at most 1e-5.
bf16 (STYLE.md): the fused error against the fp32 reference is at most twice PyTorch's own
bf16 error (the reference run in bf16) plus a small atol.
"""

import torch


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.double().abs().max().item()
    return (got.double() - ref.double()).abs().max().item() / max(scale, 1e-30)


def run_with_grads(fn, inputs, needs_grad, grad_out):
    """Call fn on leaf copies of inputs; backprop grad_out; return (output, [grads of the inputs needing one])."""
    leaves = [
        x.detach().clone().requires_grad_(g) if isinstance(x, torch.Tensor) else x for x, g in zip(inputs, needs_grad)
    ]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    grads = [x.grad for x, g in zip(leaves, needs_grad) if g]
    assert all(gr is not None for gr in grads), "an input that needs a gradient got none"
    return out.detach(), grads


def check_against_ref(
    fn, ref, inputs, needs_grad, dtype, atol_frac=1e-3, seed=0, prep=None, device="cpu", fp32_rtol=1e-5
):
    """fn and ref on inputs (fp32 CPU tensors, moved to device and cast to dtype), output and every gradient compared.

    prep(leaves) -> args may turn the leaf tensors into the call's arguments (views, chunks);
    it is applied to the leaves of each run.
    """
    g = torch.Generator().manual_seed(seed)
    cast = [
        (x.to(device, dtype) if x.is_floating_point() else x.to(device)) if isinstance(x, torch.Tensor) else x
        for x in inputs
    ]
    call = (lambda f: lambda *xs: f(*prep(list(xs)))) if prep else (lambda f: f)
    with torch.no_grad():
        shape = call(ref)(*cast).shape
    grad_out = torch.randn(shape, generator=g).to(device)
    got, got_g = run_with_grads(call(fn), cast, needs_grad, grad_out)
    if dtype == torch.float32:
        want, want_g = run_with_grads(call(ref), cast, needs_grad, grad_out)
        pairs = [("output", got, want, None)] + [
            (f"grad {i}", a, b, None) for i, (a, b) in enumerate(zip(got_g, want_g))
        ]
        for name, a, b, _ in pairs:
            assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
            err = rel_err(a, b)
            assert err <= fp32_rtol, f"{name}: fp32 relative error {err:.3g} > {fp32_rtol}"
        return
    up = [x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in cast]
    want, want_g = run_with_grads(call(ref), up, needs_grad, grad_out)  # fp32 reference on the same values
    low, low_g = run_with_grads(call(ref), cast, needs_grad, grad_out)  # PyTorch's own bf16
    for name, a, lo, hi in [("output", got, low, want)] + [
        (f"grad {i}", a, lo, hi) for i, (a, lo, hi) in enumerate(zip(got_g, low_g, want_g))
    ]:
        assert a.dtype == lo.dtype and a.shape == hi.shape, (name, a.dtype, lo.dtype)
        fused = (a.double() - hi.double()).abs().max().item()
        torch_err = (lo.double() - hi.double()).abs().max().item()
        atol = atol_frac * hi.abs().max().item()
        assert fused <= 2 * torch_err + atol, (
            f"{name}: bf16 error {fused:.3g} > 2 x torch's {torch_err:.3g} + {atol:.3g}"
        )

"""The diffusion loss with keyed, never-stored noise (ROSS_SPEC.md sections 2 and 4).

Design
------
Every image carries one 64-bit key (fastross.model.diffusion.noise_key(seed, step, index)).
All its noise comes from Triton's counter-based Philox 4x32-10 generator, `tl.randn(key,
offset)`: the key is Philox's 64-bit key, the offset its 64-bit counter. The offset's high
32 bits name a stream, the low 32 bits index an element in the *folded token layout*
(ROSS_SPEC.md section 2 step 4: token j = gy * g + gx, channel k = c * 4 + 2 * dy + dx):

    xi [i, j, k]    = randn(key_i, 1 << 32 | j * 4C + k)             posterior draw, stream 1
    eps[i, r, j, k] = randn(key_i, 0 << 32 | (r * N + j) * 4C + k)   replica r's noise, stream 0

so the draw of an element depends on (key, where it is) and nothing else: not on the rank,
the micro-batch, the block size or the launch order. Two kernels use it:

  (a) `diffusion_xt`: x0 = (mean + std * xi - shift) * scale read straight from the stored
      (n, C, 2g, 2g) moments at the folded position (no fold pass), computed once per element
      and reused for the R replicas: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps. No gradient
      (x_t is data). Writes only x_t, in the denoiser's dtype.
  (b) `eps_loss`: per-image loss = mean over (R, N, 4C) of (eps_hat - eps)^2, fp32 partial sums
      per program reduced by torch (deterministic: no atomics, so 1 rank == 2 ranks and resume
      are bit-exact). Backward regenerates eps from the same key and offsets:
      d eps_hat = 2 (eps_hat - eps) * dL_i / (R N 4C). Neither eps nor xi is ever stored.

`keyed_eps` / `keyed_xi` materialise the same eps and xi (a third, trivial kernel) for the torch
reference path and for tests, so `impl: torch` and `impl: triton` see identical noise.
`philox_randn_ref` re-implements the generator in plain torch (integer Philox + the same
Box-Muller), which pins the stream down independently of Triton; on CPU it agrees with the
interpreter to float32 rounding of log/cos.

Plan at the 7B shapes (n = 16 images, R = 4, N = 729 tokens, 4C = 64; H100: 3 TB/s):
  xt:       reads mean + std (fp32, 6.0 MB), writes x_t (bf16, 6.0 MB): 4 us of bytes;
            3.7 M normal draws, ~100 integer ops each (10 Philox rounds) + log/sqrt/cos: ~10 us.
  loss fwd: reads eps_hat (bf16, 6.0 MB) and regenerates 3.0 M draws: 2 us of bytes, ~8 us Philox.
  loss bwd: reads eps_hat, writes its gradient (12 MB): 4 us of bytes, ~8 us Philox.
  No FLOPs worth a tensor core; the whole objective is < 0.1 % of a denoiser step (~25 ms),
  and the Philox arithmetic, not the bytes, is what bounds these three kernels. What it
  saves: 15 MB of host-drawn noise per micro-batch (drawn serially on the CPU, copied host
  to device, kept until backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, elementwise_target, to_dtype

EPS_STREAM = 0
XI_STREAM = 1


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _randn_kernel(
    keys_ptr,  # (n,) int64: one Philox key per image
    out_ptr,  # (n, per_image) fp32: out[i, e] = randn(keys[i], STREAM << 32 | e)
    per_image,  # elements per image
    STREAM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    img = tl.program_id(0)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(keys_ptr + img)
    z = tl.randn(seed, e.to(tl.int64) + (STREAM << 32))
    tl.store(out_ptr + img.to(tl.int64) * per_image + e, z, mask=e < per_image)


@triton.jit
def _xt_kernel(
    mean_ptr,  # (n, C, 2g, 2g) posterior mean, contiguous
    std_ptr,  # (n, C, 2g, 2g) posterior std, contiguous
    keys_ptr,  # (n,) int64 Philox keys
    sab_ptr,  # (n, R) fp32 sqrt(alpha_bar_t) per replica
    s1m_ptr,  # (n, R) fp32 sqrt(1 - alpha_bar_t) per replica
    xt_ptr,  # (n, R, N, 4C) output, the denoiser's dtype
    shift,  # VAE shift factor
    scale,  # VAE scaling factor
    R,  # replicas
    G,  # token grid side g (N = g * g)
    NC4,  # N * 4C: elements per image and per replica, folded layout
    C4: tl.constexpr,  # 4C folded channels
    BLOCK: tl.constexpr,
):
    img = tl.program_id(0)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # folded index j * 4C + k
    mask = e < NC4
    j = e // C4
    k = e % C4
    c, dy, dx = k // 4, (k // 2) % 2, k % 2
    gy, gx = j // G, j % G
    side = 2 * G
    src = img.to(tl.int64) * NC4 + c * side * side + (2 * gy + dy) * side + 2 * gx + dx
    m = tl.load(mean_ptr + src, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(std_ptr + src, mask=mask, other=0.0).to(tl.float32)
    seed = tl.load(keys_ptr + img)
    xi = tl.randn(seed, e.to(tl.int64) + (1 << 32))  # XI_STREAM
    x0 = (m + s * xi - shift) * scale
    for r in range(R):
        a = tl.load(sab_ptr + img * R + r)
        b = tl.load(s1m_ptr + img * R + r)
        eps = tl.randn(seed, (r * NC4 + e).to(tl.int64))  # EPS_STREAM
        row = img.to(tl.int64) * R + r
        tl.store(xt_ptr + row * NC4 + e, to_dtype(a * x0 + b * eps, xt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _eps_loss_fwd_kernel(
    eh_ptr,  # (n * R, N * 4C) predicted eps, contiguous
    keys_ptr,  # (n,) int64 Philox keys
    partial_ptr,  # (n * R, NUM_BLOCKS) fp32 partial sums of squared error
    R,  # replicas
    NC4,  # N * 4C
    NUM_BLOCKS,  # programs per replica row
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)  # image * R + replica
    pid = tl.program_id(1)
    img = row // R
    r = row % R
    e = pid * BLOCK + tl.arange(0, BLOCK)
    mask = e < NC4
    seed = tl.load(keys_ptr + img)
    eps = tl.randn(seed, (r * NC4 + e).to(tl.int64))
    eh = tl.load(eh_ptr + row.to(tl.int64) * NC4 + e, mask=mask, other=0.0).to(tl.float32)
    d = tl.where(mask, eh - eps, 0.0)
    tl.store(partial_ptr + row * NUM_BLOCKS + pid, tl.sum(d * d, axis=0))


@triton.jit
def _eps_loss_bwd_kernel(
    eh_ptr,  # (n * R, N * 4C) predicted eps, contiguous
    keys_ptr,  # (n,) int64 Philox keys
    gout_ptr,  # (n,) fp32 gradient of the per-image loss
    grad_ptr,  # (n * R, N * 4C) output: gradient w.r.t. eps_hat, eps_hat's dtype
    R,  # replicas
    NC4,  # N * 4C
    inv_count,  # 1 / (R * N * 4C)
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    img = row // R
    r = row % R
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = e < NC4
    seed = tl.load(keys_ptr + img)
    eps = tl.randn(seed, (r * NC4 + e).to(tl.int64))  # regenerated, never stored
    off = row.to(tl.int64) * NC4 + e
    eh = tl.load(eh_ptr + off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gout_ptr + img) * (2.0 * inv_count)
    tl.store(grad_ptr + off, to_dtype(g * (eh - eps), grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _check_keys(keys: torch.Tensor) -> torch.Tensor:
    if keys.dtype != torch.int64 or keys.dim() != 1:
        raise ValueError(f"noise keys must be a 1-D int64 tensor, got {keys.dtype} {tuple(keys.shape)}")
    return keys.contiguous()


# torch.library custom ops (opaque to torch.compile, with fake implementations): the noise, x_t and
# the loss can sit inside a compiled region, also under the Triton interpreter.


@torch.library.custom_op("fastross::keyed_randn", mutates_args=())
def keyed_randn_op(keys: torch.Tensor, per_image: int, stream: int) -> torch.Tensor:
    """(n, per_image) fp32: randn(keys[i], stream << 32 | e)."""
    keys = _check_keys(keys)
    check_device(keys)
    out = torch.empty(keys.numel(), per_image, device=keys.device, dtype=torch.float32)
    block = min(elementwise_target(), triton.next_power_of_2(per_image))
    _randn_kernel[(keys.numel(), triton.cdiv(per_image, block))](keys, out, per_image, STREAM=stream, BLOCK=block)
    return out


@keyed_randn_op.register_fake
def _(keys, per_image, stream):
    return keys.new_empty((keys.shape[0], per_image), dtype=torch.float32)


def _randn(keys: torch.Tensor, per_image: int, stream: int) -> torch.Tensor:
    return keyed_randn_op(keys, per_image, stream)


def keyed_eps(keys: torch.Tensor, replicas: int, tokens: int, channels: int) -> torch.Tensor:
    """Materialise the eps the fused kernels draw: (n, R, N, 4C) fp32."""
    return _randn(keys, replicas * tokens * channels, EPS_STREAM).view(keys.numel(), replicas, tokens, channels)


def keyed_xi(keys: torch.Tensor, tokens: int, channels: int) -> torch.Tensor:
    """Materialise the posterior draw's xi the fused kernels draw: (n, N, 4C) fp32, folded layout."""
    return _randn(keys, tokens * channels, XI_STREAM).view(keys.numel(), tokens, channels)


def _check_xt(mean, std, keys, sqrt_ab, sqrt_1m_ab) -> None:
    if mean.shape != std.shape or mean.dim() != 4 or mean.shape[2] != mean.shape[3] or mean.shape[2] % 2:
        raise ValueError(f"latent moments must be (n, C, 2g, 2g), got {tuple(mean.shape)} and {tuple(std.shape)}")
    n, r = mean.shape[0], sqrt_ab.shape[1]
    if keys.dim() != 1 or keys.shape[0] != n or sqrt_ab.shape != (n, r) or sqrt_1m_ab.shape != (n, r):
        raise ValueError(
            f"keys {tuple(keys.shape)}, sqrt_ab {tuple(sqrt_ab.shape)}, sqrt_1m_ab "
            f"{tuple(sqrt_1m_ab.shape)} do not match {n} images"
        )


@torch.library.custom_op("fastross::diffusion_xt", mutates_args=())
def diffusion_xt_op(
    mean: torch.Tensor,
    std: torch.Tensor,
    keys: torch.Tensor,
    sqrt_ab: torch.Tensor,
    sqrt_1m_ab: torch.Tensor,
    shift: float,
    scale: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    keys = _check_keys(keys)
    _check_xt(mean, std, keys, sqrt_ab, sqrt_1m_ab)
    check_device(mean, std, keys, sqrt_ab, sqrt_1m_ab)
    n, c, side, _ = mean.shape
    r = sqrt_ab.shape[1]
    g = side // 2
    c4, tokens = 4 * c, g * g
    nc4 = tokens * c4
    xt = torch.empty(n, r, tokens, c4, device=mean.device, dtype=dtype)
    block = min(elementwise_target(), triton.next_power_of_2(nc4))
    _xt_kernel[(n, triton.cdiv(nc4, block))](
        mean.contiguous(),
        std.contiguous(),
        keys,
        sqrt_ab.float().contiguous(),
        sqrt_1m_ab.float().contiguous(),
        xt,
        float(shift),
        float(scale),
        r,
        g,
        nc4,
        C4=c4,
        BLOCK=block,
    )
    return xt


@diffusion_xt_op.register_fake
def _(mean, std, keys, sqrt_ab, sqrt_1m_ab, shift, scale, dtype):
    _check_xt(mean, std, keys, sqrt_ab, sqrt_1m_ab)
    n, c, side, _ = mean.shape
    return mean.new_empty((n, sqrt_ab.shape[1], (side // 2) ** 2, 4 * c), dtype=dtype)


def diffusion_xt(
    mean: torch.Tensor,
    std: torch.Tensor,
    keys: torch.Tensor,
    sqrt_ab: torch.Tensor,
    sqrt_1m_ab: torch.Tensor,
    shift: float,
    scale: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x_t (n, R, g*g, 4C) from the posterior moments (n, C, 2g, 2g), keys (n,) and the schedule at t (n, R)."""
    return diffusion_xt_op(mean, std, keys, sqrt_ab, sqrt_1m_ab, float(shift), float(scale), dtype)


def _loss_block(nc4: int) -> int:
    return min(elementwise_target(), triton.next_power_of_2(nc4))


@torch.library.custom_op("fastross::eps_loss", mutates_args=())
def eps_loss_op(eps_hat: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error of eps_hat (n, R, N, 4C) against the keyed eps; fp32 (n,)."""
    keys = _check_keys(keys)
    if eps_hat.dim() != 4 or eps_hat.shape[0] != keys.numel():
        raise ValueError(f"eps_hat must be (n, R, N, 4C) with n = {keys.numel()}, got {tuple(eps_hat.shape)}")
    check_device(eps_hat, keys)
    n, r, tokens, c4 = eps_hat.shape
    nc4 = tokens * c4
    eh = eps_hat.contiguous()
    block = _loss_block(nc4)
    nb = triton.cdiv(nc4, block)
    partial = torch.empty(n * r, nb, device=eh.device, dtype=torch.float32)
    _eps_loss_fwd_kernel[(n * r, nb)](eh, keys, partial, r, nc4, nb, BLOCK=block)
    return partial.view(n, r * nb).sum(dim=1) / (r * nc4)


@eps_loss_op.register_fake
def _(eps_hat, keys):
    if eps_hat.dim() != 4:
        raise ValueError(f"eps_hat must be (n, R, N, 4C), got {tuple(eps_hat.shape)}")
    return eps_hat.new_empty((eps_hat.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastross::eps_loss_bwd", mutates_args=())
def eps_loss_bwd_op(grad: torch.Tensor, eps_hat: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """d loss / d eps_hat, eps regenerated from the keys (never stored); eps_hat's shape and dtype."""
    eh = eps_hat.contiguous()
    n, r, tokens, c4 = eh.shape
    nc4 = tokens * c4
    block = _loss_block(nc4)
    out = torch.empty_like(eh)
    _eps_loss_bwd_kernel[(n * r, triton.cdiv(nc4, block))](
        eh, keys.contiguous(), grad.float().contiguous(), out, r, nc4, 1.0 / (r * nc4), BLOCK=block
    )
    return out


@eps_loss_bwd_op.register_fake
def _(grad, eps_hat, keys):
    return eps_hat.new_empty(eps_hat.shape)


def _eps_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _eps_loss_backward(ctx, grad):
    return eps_loss_bwd_op(grad, *ctx.saved_tensors), None


eps_loss_op.register_autograd(_eps_loss_backward, setup_context=_eps_loss_setup)


def eps_loss(eps_hat: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per-image loss (n,) fp32: mean over (R, N, 4C) of (eps_hat - eps)^2, eps regenerated from keys."""
    return eps_loss_op(eps_hat, keys)


# ----------------------------------------------------------------------------- references

_M32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for a < 2**32 (int64 tensor) and a 32-bit constant b, without overflow."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p, q = a_lo * b, a_hi * b  # each < 2**48
    hi = (q + (p >> 16)) >> 16
    lo = (((q & 0xFFFF) << 16) + p) & _M32
    return hi, lo


def philox_randn_ref(keys: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """tl.randn(key, offset) in plain torch: Philox 4x32-10 on (offset_lo, offset_hi, 0, 0), Box-Muller.

    keys and offsets are int64 and broadcast against each other; returns fp32.
    """
    keys, offsets = torch.broadcast_tensors(keys.to(torch.int64), offsets.to(torch.int64))
    k0, k1 = keys & _M32, (keys >> 32) & _M32
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2 = c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul32(c2, 0xCD9E8D57)
        hi_a, lo_a = _mul32(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32

    def uniform(x):  # uint32 -> [0, 1): reinterpret as int32, fold negatives, scale
        x = torch.where(x >= 1 << 31, _M32 - x, x)
        return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)

    u1 = torch.clamp(uniform(c0), min=1.0e-7)
    th = torch.tensor(6.283185307179586, dtype=torch.float32) * uniform(c1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(th)


def keyed_noise_ref(keys: torch.Tensor, replicas: int, tokens: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keyed_eps and keyed_xi through philox_randn_ref: (eps, xi)."""
    k = keys.to(torch.int64)
    e = torch.arange(replicas * tokens * channels, device=k.device)
    x = torch.arange(tokens * channels, device=k.device) + (XI_STREAM << 32)
    eps = philox_randn_ref(k[:, None], e[None]).view(-1, replicas, tokens, channels)
    xi = philox_randn_ref(k[:, None], x[None]).view(-1, tokens, channels)
    return eps, xi


def fold_ref(z: torch.Tensor) -> torch.Tensor:
    """(n, C, 2g, 2g) -> (n, g*g, 4C), channel c * 4 + 2 * dy + dx (ROSS_SPEC.md section 2 step 4)."""
    n, c, h, _ = z.shape
    g = h // 2
    return z.reshape(n, c, g, 2, g, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, 4 * c)


def diffusion_xt_ref(mean, std, xi, eps, sqrt_ab, sqrt_1m_ab, shift: float, scale: float) -> torch.Tensor:
    """x_t from materialised xi (n, N, 4C) and eps (n, R, N, 4C), in fp32."""
    x0 = (fold_ref(mean.float()) + fold_ref(std.float()) * xi - shift) * scale
    return sqrt_ab.float()[..., None, None] * x0[:, None] + sqrt_1m_ab.float()[..., None, None] * eps


def eps_loss_ref(eps_hat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """(n, R, N, 4C) prediction and materialised noise -> per-image loss (n,) in fp32."""
    return (eps_hat.float() - eps.float()).pow(2).mean(dim=(1, 2, 3))

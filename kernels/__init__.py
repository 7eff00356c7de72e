"""fastross's Triton kernels, importable as `fastross.kernels` (mapped in pyproject.toml).

One file per fused kernel: a design comment, the Triton kernels, their launchers, the operators,
and a plain-torch `*_ref` beside them (same signature). Nothing here imports fastross.

The operators are `torch.library.custom_op`s in the `fastross::` namespace, each with a fake
(shape-only) implementation and, where it has a gradient, a backward that is itself a custom op
(registered with `register_autograd`). So torch.compile (Dynamo + AOTAutograd) treats every
launch as one opaque call and never traces into Triton: a compiled block composes with these
kernels on the GPU and under the CPU interpreter alike (an autograd.Function launching Triton
cannot be traced under the interpreter). The cost: Inductor cannot fuse across the op boundary,
which is the fusion these kernels already do by hand.

| file | kernel |
|---|---|
| `diffusion_loss.py` | keyed Philox noise, x_t from the stored latent moments, the eps loss regenerating eps |
| `ln_modulate.py` | LayerNorm (no affine) fused with the adaLN modulation, forward and backward |
| `adaln.py` | SiLU(condition embedding + timestep embedding), once for every adaLN projection |
| `linear_epilogue.py` | a matmul with fused epilogues (bias + activation, bias + gated residual, activation grad) |
| `fused_mlp.py` | the modulated MLP branch and the gated attention projection, built from the two above |

CPU machines run these kernels in Triton's interpreter. TRITON_INTERPRET must be set before
any module that defines a @triton.jit kernel is imported, so it is set here, before the
kernel modules are imported, when no CUDA device is present and the caller has not chosen.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

"""fastross's Triton kernels, importable as `fastross.kernels` (mapped in pyproject.toml).

One file per fused kernel: a design comment, the Triton kernels, their launchers, an
autograd.Function, and a plain-torch `*_ref` beside them. Nothing here imports fastross.
"""

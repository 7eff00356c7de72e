"""Process group, device, and parallelize(): activation checkpointing, then compile, then FSDP2.

torchrun's rendezvous sets up the ranks; a plain `python -m fastross.train` runs as a
world of one. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from fastross.config import checkpoint_policies
from fastross.lifecycle import die_with_parent
from fastross.model.denoiser import compile_blocks as compile_denoiser_blocks, mp_policy as denoiser_mp_policy


@dataclass
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> World:
    if "RANK" not in os.environ:  # a world of one, without torchrun
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: end with it, never train on alone
        die_with_parent()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def apply_activation_checkpointing(layers: nn.ModuleList, spec) -> list[str]:
    """Wrap each decoder layer by its policy (config.checkpoint_policies); returns the policies applied.

    `full` recomputes the whole layer in backward. `selective` is op-level: the outputs of matmuls and
    attention (the expensive ops) are kept, everything else (norms, activations, RoPE, casts) is recomputed.
    torch's `checkpoint_wrapper` keeps the layer's state-dict names (its prefix is stripped on save and load).
    """
    policies = checkpoint_policies(spec, len(layers))
    for i, policy in enumerate(policies):
        if policy == "full":
            layers[i] = checkpoint_wrapper(layers[i], preserve_rng_state=False)
        elif policy == "selective":
            layers[i] = checkpoint_wrapper(layers[i], preserve_rng_state=False, context_fn=_keep_matmuls)
    return policies


@functools.cache
def _save_ops() -> frozenset:
    """The ops whose outputs a selectively checkpointed layer keeps (built once: it runs every forward)."""
    ops = {
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten.baddbmm.default,
        torch.ops.aten._scaled_mm.default,
    }
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    ):
        if hasattr(torch.ops.aten, name):
            ops.add(getattr(torch.ops.aten, name).default)
    try:  # torch.nn.attention.varlen's op (fastross's `varlen` backend)
        ops.add(torch.ops.torch_attn._varlen_attn.default)
    except (AttributeError, RuntimeError):
        pass
    return frozenset(ops)


def _keep_matmuls():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save = _save_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def compile_blocks(model) -> int:
    """torch.compile each LLM decoder layer, each denoiser block and its final layer in place (names unchanged);
    returns how many were compiled.

    Packed micro-batches change length every step, and with it the number of samples (cu_seqlens), the longest
    sample (an int) and the mask: the decoder layers are compiled with every size symbolic from the start
    (`dynamic=True`; automatic dynamic shapes would recompile each time another of them first changes).
    Identical layers share one compiled graph (parameters are graph inputs). tests/test_compile.py bounds
    the compiles.
    """
    for layer in model.llm.model.layers:
        layer.compile(dynamic=True)
    compile_denoiser_blocks(model.denoiser)  # its rows (images x replicas) marked dynamic
    return len(model.llm.model.layers) + len(model.denoiser.blocks) + 1


def parallelize(model, world: World, cfg):
    """Activation checkpointing, then compile, then FSDP2 (cfg: fastross.config.Config), as torchtitan orders them.

    FSDP2 units: one per LLM decoder layer, the denoiser, the root (projector, embeddings, final norm, lm_head).
    The frozen vision tower and VAE are left out of FSDP (`ignored_params`): each rank keeps a full replica,
    so they cost no all-gather and no reshard per micro-batch (they never get a gradient to reduce). FSDP's
    mixed precision does not cover them: `cast_frozen` sets their dtype once their weights are loaded.
    The gradient is reduced as a sum (`set_gradient_divide_factor(1.0)`): the trainer's loss is already the
    global mean over tokens and images (ROSS_SPEC.md section 5), so FSDP must not divide again.
    """
    t = cfg.train
    layers = model.llm.model.layers
    apply_activation_checkpointing(layers, t.activation_checkpointing)
    if t.compile:
        compile_blocks(model)
    mesh = init_device_mesh(world.device.type, (world.size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if t.dtype == "bf16" else None, reduce_dtype=torch.float32)
    kw = dict(mesh=mesh, mp_policy=mp)
    for layer in layers:
        fully_shard(layer, **kw)
    # model.denoiser.dtype: its own mixed precision, whatever train.dtype says
    fully_shard(model.denoiser, mesh=mesh, mp_policy=denoiser_mp_policy(model.denoiser.precision))
    fully_shard(model, ignored_params={p for part in frozen_parts(model) for p in part.parameters()}, **kw)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM, NCCL copies less
    if t.fsdp_prefetch:
        k = t.fsdp_prefetch
        for i, layer in enumerate(layers):
            layer.set_modules_to_forward_prefetch(list(layers[i + 1 : i + 1 + k]))
            layer.set_modules_to_backward_prefetch(list(layers[max(0, i - k) : i])[::-1])
    return model


def frozen_parts(model) -> list[nn.Module]:
    """The frozen pretrained parts that every rank keeps whole: the vision tower and the VAE."""
    return [model.vision] + ([model.vae] if model.vae is not None else [])


def cast_frozen(model, dtype: str) -> None:
    """Give the frozen parts the compute dtype (train.dtype) that FSDP's mixed precision gives the others."""
    for part in frozen_parts(model):
        part.to(torch.bfloat16 if dtype == "bf16" else torch.float32)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (a host object between this job's own ranks)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj, world: World) -> list:
    """Every rank's `obj` on rank 0 (a list by rank), [] elsewhere; host objects between this job's own ranks."""
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out or []

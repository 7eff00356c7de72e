"""Process group, device, and parallelize(): activation checkpointing, then FSDP2.

torchrun's rendezvous sets up the ranks; a plain `python -m fastross.train` runs as a
world of one. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from fastross.model.denoiser import mp_policy as denoiser_mp_policy


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


def parallelize(model, world: World, dtype: str, activation_checkpointing: bool):
    """One FSDP2 unit per LLM decoder layer, the vision tower, the denoiser, the VAE; the root last."""
    if activation_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh(world.device.type, (world.size,))
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if dtype == "bf16" else None, reduce_dtype=torch.float32
    )
    kw = dict(mesh=mesh, mp_policy=mp)
    for layer in model.llm.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model.vision, **kw)
    fully_shard(model.denoiser, mesh=mesh, mp_policy=denoiser_mp_policy(model.denoiser.precision))  # model.denoiser.dtype
    if model.vae is not None:
        fully_shard(model.vae, **kw)
        register_fsdp_forward_method(model.vae, "encode")  # encode() is called instead of forward()
    fully_shard(model, **kw)
    return model


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t

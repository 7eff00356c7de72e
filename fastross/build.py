"""The one way to build a RossModel: on the meta device, then freeze, then parallelize, then load.

    model = build.meta(cfg.model, attention, device_type, seed)  # the architecture, no storage
    build.freeze(model, cfg.train.trainable)                     # what trains, what stays frozen
    model = build.parallelize(model, world, cfg)                 # checkpointing -> compile -> FSDP2
    loaded = build.load(model, world.device, cfg)                # each rank's shards, frozen parts cast, init_from

`model.denoiser.impl: auto` is resolved here (`resolve`), once, for the type of device the model will run on:
the trainer for its ranks' device, the planner (fastross.memory_plan) for the device it plans for, the FLOP counter
(fastross.flops) for the device it counts for, and the tools (export and generate build the whole model on the host
with `host`, convert_checkpoint and --check the architecture with `meta`) for the device that runs the model.
RossModel itself takes a resolved impl and refuses auto.

The planner and the FLOP counter stop short of `load`: `fake` gives the built model fake tensors in its place
(shapes only, no memory), under the FakeTensorMode it returns. `checkpoint_model` is a checkpoint as a model on the
host, what an export is compared with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from fastross import checkpoint, distributed, weights
from fastross.model.denoiser import resolve_impl
from fastross.model.load import LoadReport
from fastross.model.ross import RossModel


def resolve(cfg, device_type: str):
    """cfg (fastross.config.ModelConfig) with model.denoiser.impl resolved for a model that runs on `device_type`
    ("auto": the Triton kernels on CUDA, PyTorch elsewhere; fastross.model.denoiser.resolve_impl)."""
    d = cfg.denoiser
    return dataclasses.replace(cfg, denoiser=dataclasses.replace(d, impl=resolve_impl(d.impl, device_type)))


def meta(cfg, attention: str, device_type: str, seed: int = 0) -> RossModel:
    """The model built on the meta device from its folders' config.json files: no weight read, no storage.
    cfg: fastross.config.ModelConfig; attention: a resolved fastross.model.attention backend; device_type: where it
    will run (resolves model.denoiser.impl); seed: train.seed, keys the fresh parameters."""
    return RossModel(resolve(cfg, device_type), attention, seed=seed, meta=True)


def host(cfg, attention: str, device_type: str, seed: int = 0) -> RossModel:
    """The whole model on the host, every pretrained part through Hugging Face's from_pretrained (tools and tests:
    RossModel's eager build); device_type: where it will run (resolves model.denoiser.impl)."""
    return RossModel(resolve(cfg, device_type), attention, seed=seed)


def freeze(model: RossModel, trainable) -> None:
    """Gradients for the parts in train.trainable only; the vision tower (and the VAE) never train."""
    model.requires_grad_(False)
    for part in trainable:
        getattr(model, part).requires_grad_(True)
    model.vision.requires_grad_(False)


def parallelize(model: RossModel, world: distributed.World, cfg) -> RossModel:
    """Activation checkpointing, then compile, then FSDP2, as cfg (fastross.config.Config) says
    (fastross.distributed.parallelize)."""
    return distributed.parallelize(model, world, cfg)


@dataclass
class Loaded:
    report: LoadReport  # tensors read from the folders, fresh ones drawn, bytes held per rank
    init_from: Path | None  # where model.init_from's weights were read (None: not set)


def load(model: RossModel, device: torch.device, cfg) -> Loaded:
    """Materialise a meta-built, parallelized model on `device` (only this rank's shards) and fill it from the
    folders (fresh parts drawn), give the frozen parts train.dtype, then read model.init_from's weights when set.
    cfg: fastross.config.Config."""
    report = model.load_weights(device)  # each rank's shards only
    distributed.cast_frozen(model, cfg.train.dtype)
    source = weights.load_model_weights(cfg.model.init_from, model) if cfg.model.init_from else None
    return Loaded(report, source)


def fake(model: RossModel, dtype: str | None = None):
    """In place of `load`, for the planner and the FLOP counter: the model's storage as fake tensors on the host
    (shapes only, no memory); dtype: train.dtype for the frozen parts (None: as built). Returns the
    FakeTensorMode to run the model under."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if dtype is not None:
        distributed.cast_frozen(model, dtype)  # on meta: swapping a Conv2d's weight fails under the fake mode
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model.to_empty(device="cpu")
    return mode


def checkpoint_model(path: str | Path):
    """A run folder or checkpoint folder -> (fastross's own model with the checkpoint's weights, in eval mode, on the
    host; its config): what the export is compared with (tests/test_export.py, benchmarks/export_check.py)."""
    _, cfg, state = checkpoint.read_checkpoint(path)
    model = host(cfg.model, "sdpa", "cpu", seed=cfg.train.seed)
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg

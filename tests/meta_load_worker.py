"""One rank of tests/test_meta_load.py, run under torchrun: meta build + fully_shard + load vs the eager build.

    torchrun --standalone --nproc-per-node N tests/meta_load_worker.py MODELS OUT_DIR

Each rank writes OUT_DIR/rank{r}.json: the names whose loaded values differ from the eager
model's, this rank's peak live bytes in real (non-meta) tensors during loading (counted by
LiveBytes below), the bytes it holds afterwards, and the byte figures fastross.model.load.footprint
predicts. The test judges these files, not the exit code (CPU_AND_GPU.md: gloo sometimes
aborts at exit after all work finished).
"""

from __future__ import annotations

import json
import os
import sys
import weakref
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402


def plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding t's data (a DTensor's local tensor), meta ones left out."""
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        inner = [getattr(t, a) for a in attrs]
        return [x for i in inner if isinstance(i, torch.Tensor) for x in plain_tensors(i)]
    return [] if t.is_meta else [t]


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages that ops run under this mode produce, and their peak.

    A storage is counted once, from the first op that returns a tensor on it (views share it),
    with its full size: a file region safetensors maps counts whole although only the rank's rows
    are read. It is uncounted when its last reference dies (a weakref finalizer). Storages that
    existed before the mode (the eager reference model) are never counted.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: dict[int, int] = {}

    def _freed(self, key: int) -> None:
        self.live -= self._seen.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                for x in plain_tensors(t):
                    st = x.untyped_storage()
                    key = id(st)
                    if key not in self._seen:
                        self._seen[key] = st.nbytes()
                        self.live += st.nbytes()
                        weakref.finalize(st, self._freed, key)
        self.peak = max(self.peak, self.live)
        return out


def compare(model, reference: dict) -> tuple[list[str], int]:
    """Names whose whole value differs from reference's, and how many were sharded."""
    differ, sharded = [], 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if isinstance(t, DTensor):
            sharded += 1
            t = t.full_tensor()  # a collective: every rank walks the same names in the same order
        if t.shape != reference[name].shape or not torch.equal(t, reference[name]):
            differ.append(name)
    return differ, sharded


def main(models: str, out_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from fastross import checkpoint, distributed, weights
    from fastross.config import Config, DenoiserConfig, ModelConfig, TrainConfig
    from fastross.model import load
    from fastross.model.ross import RossModel

    world = distributed.init()
    cfg = ModelConfig(
        vision_path=f"{models}/vision",
        llm_path=f"{models}/llm",
        vae_path=f"{models}/vae",
        denoiser=DenoiserConfig(kind="dit", depth=2, width=32, heads=4),
    )
    plain = Config(model=cfg, train=TrainConfig(dtype="fp32", activation_checkpointing="none"))
    eager = RossModel(cfg, seed=5)
    model = RossModel(cfg, seed=5, meta=True)
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.denoiser.requires_grad_(True)
    model.llm.requires_grad_(True)
    model = distributed.parallelize(model, world, plain)
    predicted = load.footprint(model, world.size, distributed.frozen_parts(model))

    with LiveBytes() as counter:
        report = model.load_weights(world.device)

    reference = {**dict(eager.named_parameters()), **dict(eager.named_buffers())}
    differ, sharded = compare(model, reference)
    untied = model.llm.lm_head.weight is not model.llm.model.embed_tokens.weight

    # model.init_from: a DCP checkpoint still loads over a meta-loaded model (other fresh seed first).
    ckpt = Path(out_dir, "ckpt")
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(ckpt))
    if world.rank == 0:  # what fastross's own saves write last: loading verifies it (fastross.checkpoint)
        checkpoint.write_manifest(ckpt)
    torch.distributed.barrier()
    other = distributed.parallelize(RossModel(cfg, seed=6, meta=True), world, plain)
    other.load_weights(world.device)
    fresh_differ_before, _ = compare(other, reference)
    weights.load_model_weights(ckpt, other)
    init_from_differ, _ = compare(other, reference)
    Path(out_dir, f"rank{world.rank}.json").write_text(
        json.dumps(
            {
                "differ": differ,
                "sharded": sharded,
                "untied": untied,
                "fresh_differ_before": fresh_differ_before,
                "init_from_differ": init_from_differ,
                "checked": len(list(model.named_parameters())) + len(list(model.named_buffers())),
                "peak_bytes": counter.peak,
                "held_bytes": report.held_bytes,
                "shard_bytes": predicted.shard_bytes,
                "largest_bytes": predicted.largest_bytes,
                "full_bytes": predicted.full_bytes,
                "bytes_read": report.bytes_read,
                "from_files": report.from_files,
                "fresh": report.fresh,
                "recomputed": report.recomputed,
            }
        )
    )
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

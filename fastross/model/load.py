"""Fill a meta-built, fully_shard-ed model rank by rank, straight from Hugging Face safetensors.

The model is built on the meta device (no storage), sharded with FSDP2 (each parameter a
DTensor, Shard(0) over the mesh), then `load_sharded`:
1. `to_empty(device)`: every rank allocates only its own shards (FSDP2 re-pads them in place);
2. every parameter's local shard is read from the files as a slice,
   `safe_open(file).get_slice(key)[rows]`, converted to the parameter's dtype by `copy_`;
   fresh parameters (fastross.model.init) are drawn whole from their keyed generator and
   sliced; persistent buffers are read whole;
3. the buffers no file holds (rotary `inv_freq`, the vision tower's `position_ids`, fastross's own
   tables) are recomputed.
So no rank ever holds more than its shards plus one whole tensor: safetensors maps the one
tensor being read from the file (page cache, only the touched rows are read), and a fresh
tensor is drawn whole once. The trade-off: every rank opens every file and each fresh
tensor is drawn by every rank, in exchange for no broadcast and no rank-0 bottleneck.

Without fully_shard (a plain model) the same code fills whole tensors.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from fastross.model import init


@dataclass(frozen=True)
class Source:
    prefix: str  # names inside the model that start with this ("llm.") ...
    folder: str  # ... are read from this Hugging Face folder's *.safetensors ...
    key_prefix: str  # ... under this key prefix instead ("vision_model.")


@dataclass
class LoadReport:
    from_files: int  # parameters and persistent buffers read from files
    fresh: int  # fresh parameters drawn (fastross.model.init)
    recomputed: int  # non-persistent buffers recomputed
    bytes_read: int  # bytes of file slices this rank read (the files' dtypes)
    held_bytes: int  # bytes this rank holds after loading: its (padded) shards and the buffers


class SafetensorsFolder:
    """Which file of a folder holds which key: `*.safetensors.index.json` when present, else every `*.safetensors`."""

    def __init__(self, folder: str, stack: ExitStack):
        from safetensors import safe_open

        self.folder, self._stack, self._open, self._handles = Path(folder), stack, safe_open, {}
        indexes = sorted(self.folder.glob("*.safetensors.index.json"))
        if indexes:
            self.where = {k: self.folder / f for k, f in json.loads(indexes[0].read_text())["weight_map"].items()}
        else:
            self.where = {
                k: path for path in sorted(self.folder.glob("*.safetensors")) for k in self.handle(path).keys()
            }
        if not self.where:
            raise FileNotFoundError(
                f"{folder} holds no *.safetensors files: save the model with save_pretrained(safe_serialization=True)"
            )

    def handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(self._open(str(path), framework="pt"))
        return self._handles[path]

    def get_slice(self, key: str):
        return self.handle(self.where[key]).get_slice(key)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.handle(self.where[key]).get_tensor(key)


def local_part(t: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """The tensor this rank holds (a DTensor's local shard, else t) and where it sits in the whole tensor."""
    if isinstance(t, DTensor):
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return t, tuple(slice(0, s) for s in t.shape)


# Module wrappers that parallelize may add (activation checkpointing, torch.compile): their
# attribute is not part of the name a file or an init rule knows the tensor by.
WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    for seg in WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    return name


def aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter and buffer object (tied weights have several), by object id."""
    names: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(name)
    return names


def retie(model: nn.Module, tied: list[list[str]]) -> None:
    """Make each group of names one tensor again: nn.Module.to_empty unties plain tied weights (FSDP2's DTensors
    stay tied)."""
    for group in tied:
        owner, _, leaf = group[0].rpartition(".")
        m = model.get_submodule(owner)
        table = "_parameters" if leaf in m._parameters else "_buffers"
        first = getattr(m, table)[leaf]
        for name in group[1:]:
            owner, _, leaf = name.rpartition(".")
            getattr(model.get_submodule(owner), table)[leaf] = first


def file_key(names: list[str], sources: list[Source], folders: dict[str, SafetensorsFolder]):
    """(folder, key) of the first of `names` found in its source's files; None when no source claims any name."""
    tried = []
    for name in names:
        for src in sources:
            if name.startswith(src.prefix):
                key = src.key_prefix + name[len(src.prefix) :]
                if key in folders[src.folder].where:
                    return folders[src.folder], key
                tried.append(f"{key} in {src.folder}")
    if tried:
        raise KeyError(
            f"{' / '.join(names)}: not found ({'; '.join(tried)}); is the folder the model its config names?"
        )
    return None


def non_persistent(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    return {
        f"{mname}.{b}".lstrip("."): (m, b)
        for mname, m in model.named_modules()
        for b in m._buffers
        if b in m._non_persistent_buffers_set
    }


@torch.no_grad()
def recompute_buffers(model: nn.Module) -> int:
    """Recompute every non-persistent buffer; raises naming any this function does not know how to make."""
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
    from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings

    todo = non_persistent(model)
    done = set()
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if hasattr(m, "rope_init_fn") and "inv_freq" in m._buffers:  # Hugging Face rotary embeddings
            inv_freq, m.attention_scaling = m.rope_init_fn(m.config, m.inv_freq.device)
            m.inv_freq.copy_(inv_freq)
            m.original_inv_freq = m.inv_freq  # as their __init__ sets it
            done.add(prefix + "inv_freq")
        elif isinstance(m, (SiglipVisionEmbeddings, CLIPVisionEmbeddings)):
            m.position_ids.copy_(torch.arange(m.num_positions).expand((1, -1)))
            done.add(prefix + "position_ids")
        elif hasattr(m, "reset_buffers"):  # fastross's own modules recompute their own buffers
            m.reset_buffers()
            done.update(prefix + b for b in m._buffers if b in m._non_persistent_buffers_set)
    missing = sorted(set(todo) - done)
    if missing:
        raise NotImplementedError(
            f"no recipe recomputes the non-persistent buffers {missing}: add one to "
            "fastross/model/load.py::recompute_buffers"
        )
    return len(done)


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters' and buffers' local parts."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        local = t.to_local() if isinstance(t, DTensor) else t
        st = local.untyped_storage()
        seen[st.data_ptr(), st.nbytes()] = st.nbytes()
    return sum(seen.values())


@torch.no_grad()
def load_sharded(
    model: nn.Module, sources: list[Source], fresh_rules: dict[str, init.Rule], seed: int, device: torch.device
) -> LoadReport:
    """Materialise `model` (built on meta, sharded or not) on `device` and fill it; see the module's header."""
    fresh_rules = {plain_name(n): rule for n, rule in fresh_rules.items()}
    names = aliases(model)
    tied = [n for n in names.values() if len(n) > 1]
    model.to_empty(device=device)
    retie(model, tied)
    names = aliases(model)
    persistent = [b for n, b in model.named_buffers() if n not in non_persistent(model)]
    n_files = n_fresh = nbytes = 0
    with ExitStack() as stack:
        folders = {src.folder: SafetensorsFolder(src.folder, stack) for src in sources}
        for t in [*model.parameters(), *persistent]:
            local, where = local_part(t)
            tnames = [plain_name(n) for n in names[id(t)]]
            fresh_name = next((n for n in tnames if n in fresh_rules), None)
            if fresh_name is not None:
                n_fresh += 1
                if local.numel():
                    local.copy_(init.fresh(fresh_rules[fresh_name], t.shape, seed, fresh_name)[where])
                continue
            found = file_key(tnames, sources, folders)
            if found is None:
                raise KeyError(
                    f"{' / '.join(tnames)}: neither a fresh parameter nor under any of {[s.prefix for s in sources]}"
                )
            folder, key = found
            sl = folder.get_slice(key)
            if tuple(sl.get_shape()) != tuple(t.shape):
                raise ValueError(
                    f"{key} in {folder.folder} has shape {tuple(sl.get_shape())}, the model's "
                    f"{tnames[0]} {tuple(t.shape)}: the folder's config and weights disagree"
                )
            n_files += 1
            if local.numel():
                part = sl[where] if where else folder.get_tensor(key)  # a 0-d tensor has no slice
                nbytes += part.numel() * part.element_size()
                local.copy_(part)  # converts to the parameter's dtype without a second host copy
                del part  # unmaps the file region
    recomputed = recompute_buffers(model)
    return LoadReport(n_files, n_fresh, recomputed, nbytes, storage_bytes(model))


@dataclass
class Footprint:
    full_bytes: int  # the whole model in its parameters' dtypes, what a rank held before meta loading
    shard_bytes: (
        int  # what one rank holds after loading: FSDP2's padded Shard(0) chunk of every parameter, buffers whole
    )
    largest_bytes: int  # the largest single tensor, counted at fp32 or its own dtype if wider (a fresh draw is fp32)

    @property
    def peak_bytes(self) -> int:
        """The bound on one rank's bytes while loading: its shards plus one whole tensor."""
        return self.shard_bytes + self.largest_bytes


def footprint(model: nn.Module, world_size: int, replicated: list[nn.Module] = ()) -> Footprint:
    """Byte counts of a model (meta-built is fine: only shapes and dtypes are read) sharded over world_size ranks.

    `replicated`: parts every rank keeps whole (fastross.distributed.frozen_parts: the frozen tower and VAE).
    """
    full = shard = largest = 0
    whole = {id(p) for part in replicated for p in part.parameters()}
    params = {id(p): p for p in model.parameters() if id(p) not in whole}
    kept = {id(p): p for part in replicated for p in part.parameters()}
    for t in [*params.values(), *kept.values(), *{id(b): b for b in model.buffers()}.values()]:
        size = t.element_size()
        full += t.numel() * size
        largest = max(largest, t.numel() * max(size, 4))
        if id(t) in params and t.dim():
            rows = math.ceil(t.shape[0] / world_size)  # torch.chunk's size, FSDP2 pads every rank to it
            shard += rows * math.prod(t.shape[1:]) * size
        else:
            shard += t.numel() * size
    return Footprint(full, shard, largest)

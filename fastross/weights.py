"""A model's weights from whatever fastross reads: `model.init_from`'s dispatch, and a checkpoint as a model.

This module sits above the formats it chooses among, each of which knows only its own: fastross.checkpoint (DCP: a
run folder or one checkpoint), fastross.export (a Llava folder with its denoiser sidecar) and fastross.ross_format
(the reference ROSS layout, or a stage-1 mm_projector.bin). None of them imports this module, so the imports
between them point one way: weights -> export -> ross_format -> checkpoint -> checkpoint_read.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from fastross import checkpoint, export, ross_format


def load_model_weights(path: str | Path, model) -> Path:
    """Load only the model's weights from a checkpoint (stage 2 starting from stage 1), a fastross.export folder, or
    the reference ROSS layout / a stage-1 mm_projector.bin (fastross.ross_format, tensors read weights_only)."""
    if export.is_export(path):
        return _load_export_weights(Path(path), model)
    if ross_format.is_reference(path):
        return ross_format.load_into(path, model)
    if Path(path).is_file():
        raise ValueError(
            f"model.init_from: {path} is a file, and not a reference ROSS mm_projector.bin; fastross reads a run "
            "folder, a checkpoint folder, a fastross export or the reference ROSS layout, never other pickles: load "
            "it in a trusted session and save its tensors with safetensors (a Hugging Face folder for "
            "model.vision_path/model.llm_path), or start a run from them and use its checkpoint"
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    ckpt = checkpoint.agreed(lambda: checkpoint.resolve(path, say=print), rank)
    if ckpt is None:
        raise FileNotFoundError(
            f"model.init_from: {path} holds no complete fastross checkpoint, no fastross export "
            "and no reference ROSS checkpoint or mm_projector.bin"
        )
    return checkpoint.load_model_state(ckpt, model)


def _load_export_weights(folder: Path, model) -> Path:
    """Every rank reads the whole export (fastross.export.load_export) and keeps its shards; the VAE stays as loaded."""
    state = export.load_export(folder)
    have = set(get_model_state_dict(model, options=StateDictOptions(full_state_dict=False)))
    missing = sorted(k for k in have - state.keys() if not k.startswith("vae."))
    extra = sorted(state.keys() - have)
    if missing or extra:
        raise KeyError(
            f"model.init_from: the export {folder} does not fit this model: missing {missing[:5]}, "
            f"unexpected {extra[:5]} (is model.* the export's fastross_config.yaml's?)"
        )
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    return folder

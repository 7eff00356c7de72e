"""The vision towers fastross builds, and the one place that knows what differs between them.

A vision folder's own config.json chooses the tower: its `model_type` is the vision model's
(`siglip_vision_model`, `clip_vision_model`) or the whole two-tower model's (`siglip`, `clip`), whose
`vision_config` then holds the tower. Every module that depends on the kind (the model's VisionTower,
the image processor behind fastross.data.images.ImageSpec, config validation, the Llava and reference
exports, the planner's presets) asks `kind_of` / `read_tower` instead of assuming SigLIP.

What differs (facts from transformers' modeling_siglip.py / modeling_clip.py and the reference's
ross/model/multimodal_encoder/{siglip,clip}_encoder.py):
- CLIP prepends a class token to its patches and LayerNorms the embeddings (`pre_layrnorm`) before
  the first layer; SigLIP has neither. Both use `hidden_states[select_layer]` (-2): for CLIP without
  the class token (the reference's `image_features[:, 1:]`, Llava's strategy "default"), so both give
  grid x grid tokens, grid = image_size // patch_size (CLIP ViT-L/14-336: 24 x 24 = 576).
- SigLIP's image processor resizes to height x width; CLIP's resizes the shortest side and centre-crops
  (fastross.data.images follows both).
- SigLIP's folder may hold a pooling head (`vision_use_head`), switched off here; CLIP's vision model
  has none. The post-layernorm of either is never applied to hidden states.

Nothing here imports torch or transformers at module level: the data side and the config use it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TowerKind:
    """One family of vision towers and everything fastross does differently for it."""

    name: str  # "siglip" | "clip": the family
    folder_types: tuple[str, ...]  # config.json model_type values it is chosen by (the tower, the two-tower model)
    config_class: str  # transformers class names: the tower's config, model and image processor
    model_class: str
    processor_class: str
    config_overrides: tuple[tuple[str, object], ...]  # set on the read config (load_config): SigLIP's head off
    class_tokens: int  # leading tokens before the patches (CLIP's class token), dropped from the features
    pre_norm: bool  # a LayerNorm (`pre_layrnorm`) between the embeddings and the first layer
    layer_kwargs: tuple[str, ...]  # the encoder layer's mask arguments, passed as None (full attention)
    llava_strategy: str  # Llava's vision_feature_select_strategy that drops exactly `class_tokens`
    dropped: tuple[str, ...]  # parts of the folder's tower (under "vision.") fastross never builds

    def transformers_class(self, role: str):
        """The transformers class for role "config", "model" or "processor"."""
        import transformers  # here, not at the top: see the module's last paragraph

        return getattr(
            transformers,
            {"config": self.config_class, "model": self.model_class, "processor": self.processor_class}[role],
        )

    def load_config(self, path: str | Path):
        """The folder's tower config (a two-tower folder's vision_config), the transformers defaults where its
        config.json is silent, with `config_overrides` set on it. Not passed to from_pretrained as keywords: a key
        the folder lacks (transformers 4.57's own save_pretrained omits SigLIP's `vision_use_head`) would go on to the
        model's __init__ as an unexpected keyword. Build the model with `from_pretrained(path, config=...)`."""
        config = self.transformers_class("config").from_pretrained(str(path))
        for key, value in self.config_overrides:
            setattr(config, key, value)
        return config


SIGLIP = TowerKind(
    name="siglip",
    folder_types=("siglip_vision_model", "siglip"),
    config_class="SiglipVisionConfig",
    model_class="SiglipVisionModel",
    processor_class="SiglipImageProcessor",
    config_overrides=(("vision_use_head", False),),
    class_tokens=0,
    pre_norm=False,
    layer_kwargs=("attention_mask",),
    llava_strategy="full",
    dropped=("vision.post_layernorm.", "vision.head."),
)
CLIP = TowerKind(
    name="clip",
    folder_types=("clip_vision_model", "clip"),
    config_class="CLIPVisionConfig",
    model_class="CLIPVisionModel",
    processor_class="CLIPImageProcessor",
    config_overrides=(),
    class_tokens=1,
    pre_norm=True,
    layer_kwargs=("attention_mask", "causal_attention_mask"),
    llava_strategy="default",
    dropped=("vision.post_layernorm.",),
)
KINDS = (SIGLIP, CLIP)
VISION_TYPES = tuple(t for k in KINDS for t in k.folder_types)  # every model_type a vision folder may have
# The key prefix of a vision folder's tower weights (SigLIP, CLIP, either whole model): what the exports copy from it.
VISION_FOLDER_PREFIX = "vision_model."


class TowerError(ValueError):
    """A vision folder fastross cannot build a tower from."""


def kind_of(model_type: str | None, where: str) -> TowerKind:
    """The kind a config.json model_type names; TowerError naming it, `where` and the supported types otherwise."""
    for kind in KINDS:
        if model_type in kind.folder_types:
            return kind
    raise TowerError(
        f"{where} holds a {model_type!r} model, not a supported vision tower "
        f"(model_type one of {', '.join(VISION_TYPES)})"
    )


@dataclass(frozen=True)
class Tower:
    """A vision folder's tower as plain numbers (its config.json, the transformers defaults where it is silent)."""

    kind: TowerKind
    image_size: int
    patch_size: int
    hidden_size: int
    num_hidden_layers: int

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Visual tokens per image: the patches, class token dropped."""
        return self.grid * self.grid

    def kept_layers(self, select_layer: int) -> int:
        """How many encoder layers `select_layer` (negative: from the end, as hidden_states[select_layer]) keeps."""
        n = self.num_hidden_layers
        keep = n + 1 + select_layer if select_layer < 0 else select_layer
        if not 1 <= keep <= n:
            raise TowerError(
                f"model.select_layer={select_layer} is out of range for the vision tower's {n} layers: "
                f"use -{n}..-1 or 1..{n}"
            )
        return keep


def read_tower(path: str | Path) -> Tower:
    """The tower of a vision folder, from its config.json through the kind's transformers config class (which also
    takes a two-tower folder's vision_config)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise TowerError(f"{file} is missing: {path} is not a Hugging Face vision model folder")
    kind = kind_of(json.loads(file.read_text()).get("model_type"), str(path))
    c = kind.load_config(path)
    return Tower(kind, c.image_size, c.patch_size, c.hidden_size, c.num_hidden_layers)

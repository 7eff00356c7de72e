"""The frozen vision tower: SigLIP or CLIP, as the folder's config.json says (fastross.towers).

Its image preprocessing lives on the data side (fastross.data.images: one path for the
converter, the loader and the exported processor); `preprocess_image` here is a thin wrapper.
"""

from __future__ import annotations

import functools

import torch
from PIL import Image
from torch import nn

from fastross import towers
from fastross.data.images import ImageSpec, pad_to_square, preprocess_pil  # noqa: F401  (pad_to_square re-exported)


def preprocess_image(img: Image.Image, processor, aspect: str) -> torch.Tensor:
    """PIL image -> normalised pixel values (3, S, S): fastross.data.images' path for an HF processor."""
    return preprocess_pil(img, ImageSpec.from_processor(processor), aspect)


def load_processor(path: str):
    """The folder's own image processor class (SigLIP's or CLIP's)."""
    return towers.read_tower(path).kind.transformers_class("processor").from_pretrained(path)


class VisionTower(nn.Module):
    """A SigLIP or CLIP vision model without its head, truncated after the selected layer.

    `select_layer=-2` keeps the output of the second-to-last encoder layer: the layers after
    it are dropped, so they cost nothing. The post-layernorm is never applied. CLIP's pre-layernorm
    is kept (Hugging Face's hidden_states[0] is taken after it) and its class token is dropped from
    the output, so the features are grid * grid patch tokens for either kind.
    """

    def __init__(self, path: str, select_layer: int = -2, meta: bool = False):
        """meta: build only the kept layers from the folder's config, parameters on the meta device
        (fastross.model.load fills them later); else load the weights with from_pretrained."""
        super().__init__()
        tower = towers.read_tower(path)
        kind = tower.kind
        keep = tower.kept_layers(select_layer)
        config = kind.load_config(path)
        if meta:
            config.num_hidden_layers = keep
            with torch.device("meta"):
                model = kind.transformers_class("model")(config)
        else:
            model = kind.transformers_class("model").from_pretrained(path, config=config)
        vm = model.vision_model
        vm.encoder.layers = vm.encoder.layers[:keep]
        self.embeddings = vm.embeddings
        self.pre_layrnorm = vm.pre_layrnorm if kind.pre_norm else nn.Identity()  # the folder's name for it
        self.encoder = vm.encoder
        self.kind = kind
        self.path = path
        self.hidden_size = tower.hidden_size
        self.image_size = tower.image_size
        self.patch_size = tower.patch_size
        self.grid = tower.grid
        self.num_tokens = tower.num_tokens
        self.requires_grad_(False)

    @functools.cached_property
    def image_spec(self) -> ImageSpec:
        """The folder's image processor as numbers (the VAE's input undoes its normalisation). Read when first
        needed: the planner's shape-only preset folders hold no preprocessor_config.json."""
        return ImageSpec.from_pretrained(self.path)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) -> patch features (n, grid * grid, width), row-major patch order, class token dropped."""
        x = self.pre_layrnorm(self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype)))
        masks = dict.fromkeys(self.kind.layer_kwargs)  # full attention: every mask None
        for layer in self.encoder.layers:
            x = layer(x, **masks)
            x = x[0] if isinstance(x, tuple) else x
        return x[:, self.kind.class_tokens :]

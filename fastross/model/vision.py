"""The frozen SigLIP vision tower.

Its image preprocessing lives on the data side (fastross.data.images: one path for the
converter, the loader and the exported processor); `preprocess_image` here is a thin wrapper.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from fastross.data.images import ImageSpec, pad_to_square, preprocess_pil  # noqa: F401  (pad_to_square re-exported)


def preprocess_image(img: Image.Image, processor, aspect: str) -> torch.Tensor:
    """PIL image -> normalised pixel values (3, S, S): fastross.data.images' path for an HF processor."""
    return preprocess_pil(img, ImageSpec.from_processor(processor), aspect)


def load_processor(path: str):
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor.from_pretrained(path)


class VisionTower(nn.Module):
    """SigLIP without its pooling head, truncated after the selected layer.

    `select_layer=-2` keeps the output of the second-to-last encoder layer: the layers after
    it are dropped, so they cost nothing. The post-layernorm is never applied.
    """

    def __init__(self, path: str, select_layer: int = -2, meta: bool = False):
        """meta: build only the kept layers from the folder's config, parameters on the meta device
        (fastross.model.load fills them later); else load the weights with from_pretrained."""
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        config = SiglipVisionConfig.from_pretrained(path, vision_use_head=False)
        n = config.num_hidden_layers
        keep = n + 1 + select_layer if select_layer < 0 else select_layer
        if not 1 <= keep <= n:
            raise ValueError(f"model.select_layer={select_layer} is out of range for {n} layers in {path}")
        if meta:
            config.num_hidden_layers = keep
            with torch.device("meta"):
                model = SiglipVisionModel(config)
        else:
            model = SiglipVisionModel.from_pretrained(path, vision_use_head=False)
        vm = model.vision_model
        vm.encoder.layers = vm.encoder.layers[:keep]
        self.embeddings = vm.embeddings
        self.encoder = vm.encoder
        self.hidden_size = model.config.hidden_size
        self.image_size = model.config.image_size
        self.patch_size = model.config.patch_size
        self.grid = self.image_size // self.patch_size
        self.num_tokens = self.grid * self.grid
        self.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) -> patch features (n, grid * grid, width), row-major patch order."""
        x = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
        for layer in self.encoder.layers:
            x = layer(x, attention_mask=None)
            x = x[0] if isinstance(x, tuple) else x
        return x

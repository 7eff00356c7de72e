"""The one image path: bytes -> pixel values as the vision tower sees them, and -> the VAE's input.

The converter (VAE latent moments), the loader (pixel values) and the exported processor all
use `preprocess`, so a reconstruction target always matches what the vision tower saw
(ROSS_SPEC.md section 2, step 0). Nothing here imports fastross.model or the kernels.

Every image is first normalised explicitly to 8-bit RGB (`decode`, `to_rgb8`): Pillow's
`convert("RGB")` clips 16-bit greyscale at 255 (a real 16-bit PNG came out 99% white), so 16-bit
grey is scaled to its high byte (v >> 8), as Pillow itself reads 16-bit RGB PNGs, so that one image
decodes alike in either form; palette, LA, CMYK and the other modes go through
`convert("RGB")`, which expands a palette and drops alpha as the reference does. The channel axis
is never guessed: arrays here are built channels-last from PIL and transposed explicitly.

Two backends (`data.image_backend`):
- "pil" (default), bit-exact with Hugging Face's `SiglipImageProcessor` as fastross calls it
  (`torch.equal` in tests/test_loader.py): PIL decode -> RGB -> optional pad to a square with
  the processor's mean colour -> PIL resize to the processor's size with its resampling filter
  -> rescale and normalise. The processor rescales in float64, casts to float32 and then
  normalises in float32; every output value depends only on (channel, input byte), so the
  last two steps are a 3 x 256 table computed once with exactly those operations and applied
  by indexing: bit-exact by construction and cheaper than three passes over the image.
- "torchvision": `torchvision.io.decode_jpeg` and `transforms.v2` (pad, bicubic antialiased
  resize on uint8), the same table. Faster, within 2/255 of "pil" (decode and resize round
  differently). The uint8 resize stays within that bound only when both axes scale alike (always
  for aspect "pad"); an image scaled differently per axis (aspect "square", non-square input) is
  resized by PIL after torchvision's decode. It decodes JPEG only; any other format falls back
  to the "pil" path.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

class ImageError(ValueError):
    """An image the converter skips: `reason` is its skip reason (bad_image, image_too_small, image_too_large)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


Aspect = Literal["pad", "square"]  # pad: mean-colour square first (stage 2); square: resize as given (stage 1)
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class ImageSpec:
    """What the vision tower's image processor does, as plain numbers (picklable, no transformers)."""

    height: int  # output size in pixels
    width: int
    mean: tuple[float, float, float]  # per-channel normalisation mean (of the 0..1 rescaled image)
    std: tuple[float, float, float]  # per-channel normalisation std
    rescale_factor: float  # byte -> 0..1, 1/255 for SigLIP
    resample: int  # PIL resampling filter (3: bicubic)

    @classmethod
    def from_processor(cls, processor) -> "ImageSpec":
        """From a Hugging Face image processor that resizes, rescales and normalises (SigLIP's)."""
        if not (processor.do_resize and processor.do_rescale and processor.do_normalize):
            raise ValueError(
                f"{type(processor).__name__}: fastross needs do_resize, do_rescale and do_normalize all on "
                f"(got {processor.do_resize}, {processor.do_rescale}, {processor.do_normalize}); fix the vision "
                "folder's preprocessor_config.json"
            )
        size = processor.size
        h, w = (size["height"], size["width"]) if isinstance(size, dict) else (int(size), int(size))
        return cls(h, w, tuple(map(float, processor.image_mean)), tuple(map(float, processor.image_std)),
                   float(processor.rescale_factor), int(processor.resample))

    @classmethod
    def from_pretrained(cls, path: str) -> "ImageSpec":
        """From a vision model folder's preprocessor_config.json, read by transformers (its defaults apply)."""
        from transformers import SiglipImageProcessor

        return cls.from_processor(SiglipImageProcessor.from_pretrained(path))

    @property
    def pad_fill(self) -> tuple[int, int, int]:
        """The padding colour, LLaVA's `tuple(int(m * 255) for m in image_mean)`."""
        return tuple(int(m * 255) for m in self.mean)


def _table(spec: ImageSpec) -> np.ndarray:
    """(3, 256) float32: byte v of channel c -> normalised value, in the processor's order and dtypes."""
    v = np.arange(256, dtype=np.uint8)[:, None].repeat(3, axis=1)  # (256, 3), channels last as HF computes
    x = (v.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    x = (x - np.array(spec.mean, dtype=np.float32)) / np.array(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.T)


_TABLES: dict[ImageSpec, np.ndarray] = {}


def normalise(chw: np.ndarray, spec: ImageSpec) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 (3, H, W) normalised pixel values."""
    table = _TABLES.get(spec)
    if table is None:
        table = _TABLES[spec] = _table(spec)
    out = np.empty(chw.shape, dtype=np.float32)
    for c in range(3):
        np.take(table[c], chw[c], out=out[c])
    return torch.from_numpy(out)


def pad_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre `img` on a square canvas of colour `fill` (LLaVA's `expand2square`)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # greyscale modes holding 16-bit values ("I": 32-bit ints)


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB, 16-bit grey scaled to its high byte (values of "I" past 65535 clip)."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        v = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        return Image.fromarray((v >> 8).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        raise ImageError("bad_image", "floating-point images (mode F) have no agreed range; convert them to 8 or 16 bit")
    if img.mode in ("La", "RGBa"):  # premultiplied alpha: Pillow converts these only to their plain-alpha modes
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode(data: bytes, *, min_side: int = 1, max_pixels: int | None = None) -> Image.Image:
    """Encoded image bytes -> 8-bit RGB PIL image, or ImageError (size limits checked from the header first)."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises many types for unreadable files
        raise ImageError("bad_image", f"cannot be decoded ({type(e).__name__}: {e})") from None
    w, h = img.size
    if min(w, h) < min_side:
        raise ImageError("image_too_small", f"{w}x{h} pixels, a side below {min_side}")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError("image_too_large", f"{w}x{h} pixels, more than {max_pixels}")
    try:
        img.load()
        return to_rgb8(img)
    except ImageError:
        raise
    except Exception as e:  # truncated data, bad chunks, unsupported modes
        raise ImageError("bad_image", f"cannot be decoded ({type(e).__name__}: {e})") from None


def preprocess_pil(img: Image.Image, spec: ImageSpec, aspect: Aspect) -> torch.Tensor:
    """PIL image -> normalised pixel values (3, H, W), bit-exact with the HF processor path."""
    if aspect not in ("pad", "square"):
        raise ValueError(f"image aspect must be 'pad' or 'square', got {aspect!r}")
    img = to_rgb8(img)
    if aspect == "pad":
        img = pad_to_square(img, spec.pad_fill)
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), resample=spec.resample)
    return normalise(np.asarray(img).transpose(2, 0, 1), spec)


def _preprocess_torchvision(data: bytes, spec: ImageSpec, aspect: Aspect) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    x = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    _, h, w = x.shape
    if aspect == "pad" and h != w:
        side = max(h, w)
        left, top = (side - w) // 2, (side - h) // 2
        x = TF.pad(x, [left, top, side - w - left, side - h - top], fill=list(spec.pad_fill))
    h, w = x.shape[1:]
    if (h, w) == (spec.height, spec.width):
        return normalise(x.numpy(), spec)
    if h * spec.width == w * spec.height:  # one scale for both axes: torchvision's resize is within 1 level of PIL's
        x = TF.resize(x, [spec.height, spec.width], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return normalise(x.numpy(), spec)
    # Different scales per axis (aspect "square" on a non-square image): torchvision's uint8 resize was
    # seen up to 9 levels from PIL's here, so resize with PIL (exact) after torchvision's decode.
    img = Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).numpy()))
    img = img.resize((spec.width, spec.height), resample=spec.resample)
    return normalise(np.asarray(img).transpose(2, 0, 1), spec)


def preprocess(data: bytes, spec: ImageSpec, aspect: Aspect, backend: Literal["pil", "torchvision"] = "pil") -> torch.Tensor:
    """Encoded image bytes -> normalised pixel values (3, H, W) float32.

    backend "torchvision" decodes RGB and greyscale JPEG with torchvision and falls back to "pil" for any other
    format or mode (CMYK JPEG: torchvision's conversion is not Pillow's).
    """
    if aspect not in ("pad", "square"):
        raise ValueError(f"image aspect must be 'pad' or 'square', got {aspect!r}")
    if backend not in ("pil", "torchvision"):
        raise ValueError(f"image backend must be 'pil' or 'torchvision', got {backend!r}")
    if backend == "torchvision" and data[:3] == JPEG_MAGIC and Image.open(io.BytesIO(data)).mode in ("RGB", "L"):
        return _preprocess_torchvision(data, spec, aspect)
    return preprocess_pil(decode(data), spec, aspect)


def vae_input(pixel_values: torch.Tensor, grid: int) -> torch.Tensor:
    """Normalised pixel values (mean 0.5, std 0.5) -> the VAE's input in [-1, 1] at 16 x grid pixels."""
    x = (pixel_values * 0.5 + 0.5) * 2 - 1
    x = x.clamp(-1, 1)
    return F.interpolate(x, size=(16 * grid, 16 * grid), mode="bilinear", align_corners=False)


@torch.no_grad()
def latent_moments(vae, pixel_values: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std, (n, C, 2g, 2g) each, in fp32 (the converter's, or on the fly)."""
    x = vae_input(pixel_values.float(), grid).to(vae.dtype)
    dist = vae.encode(x).latent_dist
    return dist.mean.float(), dist.std.float()

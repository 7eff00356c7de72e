"""The one image path: bytes -> pixel values as the vision tower sees them, and -> the VAE's input.

The converter (VAE latent moments), the loader (pixel values) and the exported processor all
use `preprocess`, so a reconstruction target always matches what the vision tower saw
(ROSS_SPEC.md section 2, step 0). Nothing here imports fastross.model or the kernels.

Only the formats LLaVA data holds are opened (`FORMATS`: PNG, JPEG, WebP, GIF and BMP, TIFF), each
recognised by its leading bytes (`sniff_format`) before Pillow sees it and opened with that one Pillow
plugin (`Image.open(formats=...)`): any other file (EPS, which Pillow hands to Ghostscript, PDF, SVG, ICO,
...) is a `bad_image` skip naming its format, so untrusted records never reach another decoder. An
animated GIF, WebP or PNG is its first frame.

Every image is first normalised explicitly to 8-bit RGB (`decode`, `to_rgb8`): Pillow's
`convert("RGB")` clips 16-bit greyscale at 255 (a real 16-bit PNG came out 99% white), so 16-bit
grey is scaled to its high byte (v >> 8), as Pillow itself reads 16-bit RGB PNGs, so that one image
decodes alike in either form; palette, LA, CMYK and the other modes go through
`convert("RGB")`, which expands a palette and drops alpha as the reference does. The channel axis
is never guessed: arrays here are built channels-last from PIL and transposed explicitly.

Two backends (`data.image_backend`):
- "pil" (default), bit-exact with Hugging Face's `SiglipImageProcessor` and `CLIPImageProcessor`
  as fastross calls them (`torch.equal` in tests/test_loader.py, tests/test_clip.py): PIL decode ->
  RGB -> optional pad to a square with the processor's mean colour -> PIL resize with the
  processor's resampling filter (SigLIP: to its height x width; CLIP: the shortest side to
  `shortest_edge`, then a centre crop to its crop size) -> rescale and normalise. The processor
  rescales in float64, casts to float32 and then normalises in float32; every output value depends
  only on (channel, input byte), so the last two steps are a 3 x 256 table computed once with
  exactly those operations and applied by indexing: bit-exact by construction and cheaper than
  three passes over the image.
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

from fastross.towers import read_tower


class ImageError(ValueError):
    """An image the converter skips: `reason` is its skip reason (bad_image, image_too_small, image_too_large)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


Aspect = Literal["pad", "square"]  # pad: mean-colour square first (stage 2); square: resize as given (stage 1)
JPEG_MAGIC = b"\xff\xd8\xff"
# The formats opened, by Pillow's plugin name: the leading bytes that identify each.
FORMATS = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (JPEG_MAGIC,),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
    "WEBP": (),  # RIFF....WEBP: checked in sniff_format
}
# Formats refused, by their leading bytes: named in the skip reason.
OTHER_FORMATS = (
    (b"%!PS", "EPS/PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS (DOS binary)"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"),
    (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"icns", "ICNS"),
    (b"DDS ", "DDS"),
    (b"qoif", "QOI"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"#?RADIANCE", "HDR"),
    (b"P1", "PBM"),
    (b"P2", "PGM"),
    (b"P3", "PPM"),
    (b"P4", "PBM"),
    (b"P5", "PGM"),
    (b"P6", "PPM"),
    (b"\x0a", "PCX"),
    (b"SIMPLE  =", "FITS"),
    (b"#define", "XBM"),
    (b"/* XPM */", "XPM"),
)


@dataclass(frozen=True)
class ImageSpec:
    """What the vision tower's image processor does, as plain numbers (picklable, no transformers)."""

    height: int  # output size in pixels
    width: int
    mean: tuple[float, float, float]  # per-channel normalisation mean (of the 0..1 rescaled image)
    std: tuple[float, float, float]  # per-channel normalisation std
    rescale_factor: float  # byte -> 0..1, 1/255 for SigLIP
    resample: int  # PIL resampling filter (3: bicubic)
    shortest_edge: int = 0  # 0: resize to height x width (SigLIP); else resize the shortest side to this, then
    #                          centre-crop to height x width (CLIP)

    @classmethod
    def from_processor(cls, processor) -> ImageSpec:
        """From a Hugging Face image processor that resizes (SigLIP's), or resizes the shortest side and centre-crops
        (CLIP's), then rescales and normalises."""
        name = type(processor).__name__
        if not (processor.do_resize and processor.do_rescale and processor.do_normalize):
            raise ValueError(
                f"{name}: fastross needs do_resize, do_rescale and do_normalize all on "
                f"(got {processor.do_resize}, {processor.do_rescale}, {processor.do_normalize}); fix the vision "
                "folder's preprocessor_config.json"
            )
        size, crop = processor.size, getattr(processor, "do_center_crop", False) and processor.crop_size
        shortest = 0
        if isinstance(size, dict) and "shortest_edge" in size:
            if not crop:
                raise ValueError(
                    f"{name}: size {size} without do_center_crop gives images of varying shape; fastross "
                    "needs a square crop: set do_center_crop and crop_size in preprocessor_config.json"
                )
            shortest = int(size["shortest_edge"])
            h, w = int(crop["height"]), int(crop["width"])
            if max(h, w) > shortest:
                raise ValueError(
                    f"{name}: crop_size {crop} is larger than the resized shortest side {shortest}; "
                    "Hugging Face would pad it with black, fastross does not"
                )
        else:
            h, w = (size["height"], size["width"]) if isinstance(size, dict) else (int(size), int(size))
            if crop and (int(crop["height"]), int(crop["width"])) != (h, w):
                raise ValueError(f"{name}: a centre crop {crop} after resizing to {size} is not supported")
        return cls(
            h,
            w,
            tuple(map(float, processor.image_mean)),
            tuple(map(float, processor.image_std)),
            float(processor.rescale_factor),
            int(processor.resample),
            shortest,
        )

    @classmethod
    def from_pretrained(cls, path: str) -> ImageSpec:
        """From a vision model folder's preprocessor_config.json, read by the image processor class of the folder's
        tower (fastross.towers; transformers' defaults apply)."""
        return cls.from_processor(read_tower(path).kind.transformers_class("processor").from_pretrained(path))

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of an image of this size after the resize step, as Hugging Face computes it."""
        if not self.shortest_edge:
            return self.width, self.height
        short, long = min(width, height), max(width, height)
        new_long = int(self.shortest_edge * long / short)  # transformers' get_resize_output_image_size
        return (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the centre crop of a resized image, transformers' center_crop offsets."""
        left, top = (width - self.width) // 2, (height - self.height) // 2
        return left, top, left + self.width, top + self.height

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
        raise ImageError(
            "bad_image", "floating-point images (mode F) have no agreed range; convert them to 8 or 16 bit"
        )
    if img.mode in ("La", "RGBa"):  # premultiplied alpha: Pillow converts these only to their plain-alpha modes
        img = img.convert("RGBA")
    return img.convert("RGB")


def sniff_format(data: bytes) -> str:
    """The format of encoded image bytes, by their leading bytes: a key of FORMATS, or ImageError("bad_image")
    naming the format found (or the first bytes, when none is recognised)."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for name, magics in FORMATS.items():
        if any(head.startswith(m) for m in magics):
            return name
    if head[:4] == b"RIFF":
        found = f"RIFF {head[8:12]!r}"
    else:
        text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
        found = next((name for magic, name in OTHER_FORMATS if head.startswith(magic)), None)
        if found is None and (text.startswith(b"<svg") or text.startswith(b"<?xml")):
            found = "SVG/XML"
        if found is None:
            found = f"unrecognised (first bytes {head[:8].hex(' ')})" if head else "empty file"
    raise ImageError("bad_image", f"format {found} is not one fastross opens ({', '.join(FORMATS)})")


def open_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> a lazily decoded PIL image of an allowed format, opened with that format's plugin only."""
    fmt = sniff_format(data)
    return Image.open(io.BytesIO(data), formats=[fmt])


def decode(data: bytes, *, min_side: int = 1, max_pixels: int | None = None) -> Image.Image:
    """Encoded image bytes -> 8-bit RGB PIL image, or ImageError (size limits checked from the header first).

    Only FORMATS are opened (`sniff_format`); of an animated image, its first frame."""
    fmt = sniff_format(data)
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
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
    size = spec.resized(*img.size)
    if img.size != size:
        img = img.resize(size, resample=spec.resample)
    if img.size != (spec.width, spec.height):
        img = img.crop(spec.crop_box(*img.size))
    return normalise(np.asarray(img).transpose(2, 0, 1), spec)


def _preprocess_torchvision(data: bytes, spec: ImageSpec, aspect: Aspect) -> torch.Tensor:
    # torchvision only for data.image_backend=torchvision: the default "pil" backend never imports it
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode, functional as TF

    x = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    _, h, w = x.shape
    if aspect == "pad" and h != w:
        side = max(h, w)
        left, top = (side - w) // 2, (side - h) // 2
        x = TF.pad(x, [left, top, side - w - left, side - h - top], fill=list(spec.pad_fill))
    h, w = x.shape[1:]
    rw, rh = spec.resized(w, h)
    if (h, w) != (rh, rw) and h * rw == w * rh:  # one scale for both axes: within 1 level of PIL's resize
        x = TF.resize(x, [rh, rw], interpolation=InterpolationMode.BICUBIC, antialias=True)
    elif (h, w) != (rh, rw):
        # Different scales per axis (aspect "square" on a non-square image, or CLIP's shortest-side resize rounding
        # the long side): torchvision's uint8 resize was seen up to 9 levels from PIL's here, so resize with PIL
        # (exact) after torchvision's decode.
        img = Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).numpy()))
        x = torch.from_numpy(np.array(img.resize((rw, rh), resample=spec.resample)).transpose(2, 0, 1))
    left, top, right, bottom = spec.crop_box(rw, rh)
    return normalise(np.ascontiguousarray(x[:, top:bottom, left:right].numpy()), spec)


def preprocess(
    data: bytes, spec: ImageSpec, aspect: Aspect, backend: Literal["pil", "torchvision"] = "pil"
) -> torch.Tensor:
    """Encoded image bytes -> normalised pixel values (3, H, W) float32.

    backend "torchvision" decodes RGB and greyscale JPEG with torchvision and falls back to "pil" for any other
    format or mode (CMYK JPEG: torchvision's conversion is not Pillow's).
    """
    if aspect not in ("pad", "square"):
        raise ValueError(f"image aspect must be 'pad' or 'square', got {aspect!r}")
    if backend not in ("pil", "torchvision"):
        raise ValueError(f"image backend must be 'pil' or 'torchvision', got {backend!r}")
    if backend == "torchvision" and data[:3] == JPEG_MAGIC and open_image(data).mode in ("RGB", "L"):
        return _preprocess_torchvision(data, spec, aspect)
    return preprocess_pil(decode(data), spec, aspect)


def vae_input(pixel_values: torch.Tensor, grid: int, spec: ImageSpec) -> torch.Tensor:
    """Normalised pixel values -> the VAE's input in [-1, 1] at 16 x grid pixels (ROSS_SPEC.md section 2).

    The normalisation is undone with the processor's own mean and std (SigLIP's 0.5, CLIP's per-channel
    values), as the reference does with the image_mean / image_std it stores in its config."""
    mean = torch.tensor(spec.mean, dtype=pixel_values.dtype, device=pixel_values.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=pixel_values.dtype, device=pixel_values.device).view(1, 3, 1, 1)
    x = (pixel_values * std + mean) * 2 - 1
    x = x.clamp(-1, 1)
    return F.interpolate(x, size=(16 * grid, 16 * grid), mode="bilinear", align_corners=False)


@torch.no_grad()
def latent_moments(vae, pixel_values: torch.Tensor, grid: int, spec: ImageSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std, (n, C, 2g, 2g) each, in fp32 (the converter's, or on the fly)."""
    x = vae_input(pixel_values.float(), grid, spec).to(vae.dtype)
    dist = vae.encode(x).latent_dist
    return dist.mean.float(), dist.std.float()

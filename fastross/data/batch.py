"""Samples -> one packed micro-batch: a single sequence, positions restarting per sample.

Two parts, composed by `Collator`: `pack_text` (token ids, positions, boundaries, supervised
positions, where the visual tokens go) and `image_batch` (pixel values, noise keys, timesteps,
latent moments). A micro-batch without a real image gets one weight-0 dummy image sample, made
in one place (`Collator.__call__`) from a dummy text part and `dummy_images`.

Everything that needs a Python loop over samples happens here, in the loader's workers, so
the training step itself never loops over samples or syncs with the host.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from fastross.data.images import ImageSpec, preprocess
from fastross.data.noise import draw_timesteps, noise_key
from fastross.data.schema import ShardMeta
from fastross.data.templates import IGNORE


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (1, T) int64, each `<image>` expanded to its visual tokens
    position_ids: torch.Tensor  # (1, T) int64, restarting at 0 for every sample
    cu_seqlens: torch.Tensor  # (B + 1,) int32 sample boundaries in the packed sequence
    doc_ids: torch.Tensor  # (T,) int64 the sample each token belongs to
    max_seqlen: int  # the longest sample's length (host int, for varlen kernels)
    text_pos: torch.Tensor  # (K,) positions whose next token is supervised (at least one entry)
    text_targets: torch.Tensor  # (K,) the supervised next tokens (-100 for a dummy entry)
    visual_pos: torch.Tensor  # (max(n, 1) * N,) visual token positions, image-major, row-major patches
    pixel_values: torch.Tensor  # (max(n, 1), 3, S, S); a zero dummy when n == 0
    image_weight: torch.Tensor  # (max(n, 1),) 1 for a real image, 0 for the dummy
    t: torch.Tensor  # (max(n, 1), R) int64 timesteps, drawn on the host from noise_keys
    noise_keys: torch.Tensor  # (max(n, 1),) int64 per-image key of eps and the posterior draw (0: dummy)
    latent_mean: torch.Tensor | None  # (max(n, 1), C, 2g, 2g) stored moments, or None: VAE on the fly
    latent_std: torch.Tensor | None
    num_images: int  # n, real images
    num_text_tokens: int  # supervised tokens (the dummy entry not counted)
    sample_ids: tuple[str, ...] = ()  # the samples' ids, for naming them when a step goes wrong

    def map_tensors(self, fn, kind: type = torch.Tensor) -> MicroBatch:
        """A copy with `fn` applied to every field of type `kind` (the tensors; the loader's slots)."""
        return MicroBatch(
            **{f.name: fn(v) if isinstance(v := getattr(self, f.name), kind) else v for f in fields(self)}
        )

    def to(self, device, non_blocking: bool = True) -> MicroBatch:
        return self.map_tensors(lambda v: v.to(device, non_blocking=non_blocking))


@dataclass
class TextSample:
    id: str  # for error messages
    input_ids: np.ndarray  # int64, one `<image>` id where the image goes
    labels: np.ndarray  # int64, -100 where unsupervised
    has_image: bool

    @classmethod
    def of(cls, s: dict) -> TextSample:
        return cls(
            str(s["id"]), np.asarray(s["input_ids"], np.int64), np.asarray(s["labels"], np.int64), len(s["image"]) > 0
        )


@dataclass
class PackedText:
    input_ids: np.ndarray  # (T,)
    position_ids: np.ndarray  # (T,)
    cu_seqlens: np.ndarray  # (B + 1,)
    text_pos: np.ndarray  # (K,) supervised positions (a dummy entry when none)
    text_targets: np.ndarray  # (K,)
    visual_pos: np.ndarray  # (n * N,)
    num_text_tokens: int  # K without the dummy entry


def pack_text(
    samples: list[TextSample], image_token_id: int, num_visual: int, pad_to: int = 0, pad_id: int = 0
) -> PackedText:
    """Concatenate samples into one sequence, each `<image>` expanded to `num_visual` tokens.

    pad_to (data.packing=padded): every shorter sample is right-padded with `pad_id` to that length, the padding
    unsupervised and inside the sample's own span, so under causal attention no real token sees it: the losses are
    those of the unpadded batch, the compute that of the reference's padded batch."""
    ids, pos, tpos, ttgt, vpos = [], [], [], [], []
    offset, cu = 0, [0]
    for s in samples:
        x, y = s.input_ids, s.labels
        at = np.flatnonzero(x == image_token_id)
        if len(at) != int(s.has_image):
            raise ValueError(f"sample {s.id!r}: {len(at)} <image> tokens for {int(s.has_image)} images")
        if s.has_image:
            p = int(at[0])
            x = np.concatenate([x[:p], np.full(num_visual, image_token_id), x[p + 1 :]])
            y = np.concatenate([y[:p], np.full(num_visual, IGNORE), y[p + 1 :]])
            vpos.append(offset + p + np.arange(num_visual))
        target = np.append(y[1:], IGNORE)  # next-token targets, never across samples
        if len(x) < pad_to:
            target = np.append(target, np.full(pad_to - len(x), IGNORE))
            x = np.append(x, np.full(pad_to - len(x), pad_id))
        sup = np.flatnonzero(target != IGNORE)
        tpos.append(offset + sup)
        ttgt.append(target[sup])
        ids.append(x)
        pos.append(np.arange(len(x)))
        offset += len(x)
        cu.append(offset)
    tpos_a, ttgt_a = np.concatenate(tpos), np.concatenate(ttgt)
    n_text = len(tpos_a)
    if n_text == 0:  # a dummy entry keeps lm_head in the graph; target -100 adds nothing
        tpos_a, ttgt_a = np.zeros(1, np.int64), np.full(1, IGNORE)
    return PackedText(
        np.concatenate(ids),
        np.concatenate(pos),
        np.asarray(cu, np.int32),
        tpos_a,
        ttgt_a,
        np.concatenate(vpos) if vpos else np.zeros(0, np.int64),
        n_text,
    )


@dataclass
class ImageBatch:
    pixel_values: torch.Tensor  # (n, 3, S, S)
    image_weight: torch.Tensor  # (n,)
    t: torch.Tensor  # (n, R)
    noise_keys: torch.Tensor  # (n,)
    latent_mean: torch.Tensor | None  # (n, C, 2g, 2g), None: the VAE encodes on the fly
    latent_std: torch.Tensor | None
    num_images: int  # real images (0 for the dummy)


def image_batch(
    samples: list[dict], step: int, *, meta: ShardMeta, spec: ImageSpec, backend: str, seed: int, replicas: int
) -> ImageBatch:
    """The images of `samples` (all with an image): decoded, preprocessed, keyed for `step`."""
    pix = torch.stack([preprocess(s["image"], spec, meta.image_aspect, backend) for s in samples])
    stored = [len(s["latent_mean"]) > 0 for s in samples]
    if any(stored) and not all(stored):
        raise ValueError("some samples of this micro-batch have stored latent moments and some do not")
    mean = std = None
    if all(stored):
        mean = torch.from_numpy(np.stack([meta.decode_latent(s["latent_mean"]) for s in samples]))
        std = torch.from_numpy(np.stack([meta.decode_latent(s["latent_std"]) for s in samples]))
    keys = torch.tensor([noise_key(seed, step, int(s["index"])) for s in samples], dtype=torch.long)
    t = draw_timesteps(keys, replicas)  # eps, xi: drawn in the model from the keys
    return ImageBatch(pix, torch.ones(len(samples)), t, keys, mean, std, len(samples))


def dummy_images(*, spec: ImageSpec, grid: int, latent_channels: int, replicas: int) -> ImageBatch:
    """One weight-0 image sample: zero pixels, key 0, timesteps 0, zero latents."""
    lat = torch.zeros(1, latent_channels, 2 * grid, 2 * grid)
    return ImageBatch(
        torch.zeros(1, 3, spec.height, spec.width),
        torch.zeros(1),
        torch.zeros(1, replicas, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
        lat,
        lat.clone(),
        0,
    )


class Collator:
    def __init__(
        self,
        *,
        meta: ShardMeta,
        image: ImageSpec,
        latent_channels: int,
        replicas: int,
        seed: int,
        image_backend: str = "pil",
        pad: bool = False,
    ):
        """pad: the reference's padded micro-batches (data.packing=padded; `pack_text`)."""
        self.meta, self.image, self.backend, self.pad = meta, image, image_backend, pad
        self.latent_channels, self.replicas, self.seed = latent_channels, replicas, seed

    def __call__(self, samples: list[dict], step: int) -> MicroBatch:
        meta = self.meta
        text = [TextSample.of(s) for s in samples]
        with_image = [s for s in samples if len(s["image"])]
        if with_image:
            images = image_batch(
                with_image,
                step,
                meta=meta,
                spec=self.image,
                backend=self.backend,
                seed=self.seed,
                replicas=self.replicas,
            )
        else:
            # A weight-0 dummy image sample, its visual tokens alone: the micro-batch then has the
            # same graph as any other (vision, projector scatter, LLM, denoiser on hidden states),
            # so FSDP's collectives run in the same order on every rank. An empty micro-batch
            # (a rank with less work this step) is this dummy alone. It adds nothing to any loss.
            text.append(TextSample("(dummy image)", np.full(1, meta.image_token_id), np.full(1, IGNORE), True))
            images = dummy_images(
                spec=self.image, grid=meta.grid, latent_channels=self.latent_channels, replicas=self.replicas
            )
        n_vis, pad_to = meta.num_visual_tokens, 0
        if self.pad and samples:  # the longest real sample, its image expanded
            pad_to = max(len(t.input_ids) + (n_vis - 1) * t.has_image for t in text[: len(samples)])
        packed = pack_text(text, meta.image_token_id, n_vis, pad_to=pad_to)
        cu = packed.cu_seqlens
        return MicroBatch(
            input_ids=torch.from_numpy(packed.input_ids)[None],
            position_ids=torch.from_numpy(packed.position_ids)[None],
            cu_seqlens=torch.from_numpy(cu),
            doc_ids=torch.from_numpy(np.repeat(np.arange(len(cu) - 1), np.diff(cu))),
            max_seqlen=int(np.diff(cu).max()),
            text_pos=torch.from_numpy(packed.text_pos),
            text_targets=torch.from_numpy(packed.text_targets),
            visual_pos=torch.from_numpy(packed.visual_pos),
            pixel_values=images.pixel_values,
            image_weight=images.image_weight,
            t=images.t,
            noise_keys=images.noise_keys,
            latent_mean=images.latent_mean,
            latent_std=images.latent_std,
            num_images=images.num_images,
            num_text_tokens=packed.num_text_tokens,
            sample_ids=tuple(t.id for t in text[: len(samples)]),
        )

"""Samples -> one packed micro-batch: a single sequence, positions restarting per sample.

Everything that needs a Python loop over samples happens here, in the data path, so the
training step itself never loops over samples or syncs with the host.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image

from fastross.data.schema import decode_latent
from fastross.data.templates import IGNORE
from fastross.model import diffusion
from fastross.model.vision import preprocess_image


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

    def to(self, device) -> "MicroBatch":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        return MicroBatch(**kw)


class Collator:
    def __init__(self, *, meta: dict, processor, latent_channels: int, replicas: int, seed: int):
        """meta: the shards' fastross.json (template settings, grid, image token, latent layout)."""
        self.meta = meta
        self.processor = processor
        self.aspect = meta["image_aspect"]
        self.image_token_id = meta["image_token_id"]
        grid = meta["grid"]
        self.grid = grid
        self.num_visual = grid * grid
        self.latent_channels = latent_channels
        self.replicas = replicas
        self.seed = seed

    def image_size(self) -> int:
        size = self.processor.size
        return size["height"] if isinstance(size, dict) else int(size)

    def __call__(self, samples: list[dict], step: int) -> MicroBatch:
        nv = self.num_visual
        ids, pos, tpos, ttgt, vpos, pix, means, stds, keys = [], [], [], [], [], [], [], [], []
        offset, n_img, cu = 0, 0, [0]
        for s in samples:
            x = np.asarray(s["input_ids"], dtype=np.int64)
            y = np.asarray(s["labels"], dtype=np.int64)
            at = np.flatnonzero(x == self.image_token_id)
            has_image = len(s["image"]) > 0
            if len(at) != int(has_image):
                raise ValueError(f"sample {s['id']!r}: {len(at)} <image> tokens for {int(has_image)} images")
            if has_image:
                p = int(at[0])
                x = np.concatenate([x[:p], np.full(nv, self.image_token_id), x[p + 1:]])
                y = np.concatenate([y[:p], np.full(nv, IGNORE), y[p + 1:]])
                vpos.append(offset + p + np.arange(nv))
                img = Image.open(io.BytesIO(s["image"]))
                pix.append(preprocess_image(img, self.processor, self.aspect))
                if len(s["latent_mean"]):
                    means.append(torch.from_numpy(decode_latent(s["latent_mean"], self.meta)))
                    stds.append(torch.from_numpy(decode_latent(s["latent_std"], self.meta)))
                keys.append(diffusion.noise_key(self.seed, step, int(s["index"])))
                n_img += 1
            n = len(x)
            target = np.append(y[1:], IGNORE)  # next-token targets, never across samples
            sup = np.flatnonzero(target != IGNORE)
            tpos.append(offset + sup)
            ttgt.append(target[sup])
            ids.append(x)
            pos.append(np.arange(n))
            offset += n
            cu.append(offset)
        if n_img == 0:
            # A weight-0 dummy image sample, its visual tokens alone: the micro-batch then has the
            # same graph as any other (vision, projector scatter, LLM, denoiser on hidden states),
            # so FSDP's collectives run in the same order on every rank. An empty micro-batch
            # (a rank with less work this step) is this dummy alone. It adds nothing to any loss.
            ids.append(np.full(nv, self.image_token_id))
            pos.append(np.arange(nv))
            vpos.append(offset + np.arange(nv))
            tpos.append(np.zeros(0, np.int64))
            ttgt.append(np.zeros(0, np.int64))
            offset += nv
            cu.append(offset)
        if means and len(means) != n_img:
            raise ValueError("some samples of this micro-batch have stored latent moments and some do not")

        tpos_a, ttgt_a = np.concatenate(tpos), np.concatenate(ttgt)
        n_text = len(tpos_a)
        if n_text == 0:  # a dummy entry keeps lm_head in the graph; target -100 adds nothing
            tpos_a, ttgt_a = np.zeros(1, np.int64), np.full(1, IGNORE)
        g, c = self.grid, self.latent_channels
        lat_shape = (c, 2 * g, 2 * g)
        if n_img:
            noise_keys = torch.tensor(keys, dtype=torch.long)
            t = diffusion.draw_timesteps(noise_keys, self.replicas)  # eps, xi: drawn in the model from the keys
            pixel_values = torch.stack(pix)
            weight = torch.ones(n_img)
        else:  # the dummy image sample's pixels, noise and latents; weight 0
            size = self.image_size()
            t = torch.zeros(1, self.replicas, dtype=torch.long)
            noise_keys = torch.zeros(1, dtype=torch.long)
            pixel_values = torch.zeros(1, 3, size, size)
            weight = torch.zeros(1)
        if means:
            mean, std = torch.stack(means), torch.stack(stds)
        elif n_img == 0:
            mean, std = torch.zeros(1, *lat_shape), torch.zeros(1, *lat_shape)
        else:
            mean = std = None
        return MicroBatch(
            input_ids=torch.from_numpy(np.concatenate(ids))[None],
            position_ids=torch.from_numpy(np.concatenate(pos))[None],
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            doc_ids=torch.from_numpy(np.repeat(np.arange(len(cu) - 1), np.diff(cu))),
            max_seqlen=int(np.diff(cu).max()),
            text_pos=torch.from_numpy(tpos_a),
            text_targets=torch.from_numpy(ttgt_a),
            visual_pos=torch.from_numpy(np.concatenate(vpos)),
            pixel_values=pixel_values,
            image_weight=weight,
            t=t, noise_keys=noise_keys, latent_mean=mean, latent_std=std,
            num_images=n_img, num_text_tokens=n_text,
        )

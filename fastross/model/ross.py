"""The ROSS model: vision tower -> projector -> LLM, plus the denoiser on the visual hidden states.

Composed from Hugging Face parts, never subclassed. `forward` takes one packed micro-batch
(fastross.data.batch.MicroBatch) and returns loss *sums* with their counts; the trainer
divides by counts over the whole global batch (ROSS_SPEC.md section 5).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastross.model import diffusion, init, liger, load, text_loss
from fastross.model.attention import build_mask, register as register_attention
from fastross.model.denoiser import Denoiser
from fastross.model.projector import Projector
from fastross.model.vision import VisionTower


@dataclass
class LossSums:
    text: torch.Tensor  # summed CE over the micro-batch's supervised tokens (fp32 scalar)
    recon: torch.Tensor  # summed per-image reconstruction loss over real images (fp32 scalar)


class RossModel(nn.Module):
    """Two builds that give equal weights (tests/test_meta_load.py):

    - eager (`meta=False`, tests and tools; fastross.build.host): every pretrained part through Hugging Face's
      from_pretrained, whole, on the host;
    - meta (`meta=True`, the trainer; fastross.build.meta): every part built from its folder's config on the meta
      device, no storage at all; after `fully_shard`, `load_weights(device)` materialises each
      rank's shards and fills them from the safetensors files (fastross.model.load).

    Fresh parts (projector, denoiser) are drawn in both builds from generators keyed by
    (seed, parameter name) (fastross.model.init), so their values do not depend on the build,
    the rank count or the order of construction.
    """

    FRESH = ("projector", "denoiser")  # parts not read from any folder

    def __init__(self, cfg, attention: str = "sdpa", seed: int = 0, meta: bool = False):
        """cfg: fastross.config.ModelConfig, model.denoiser.impl resolved (fastross.build builds through here);
        attention: a resolved fastross.model.attention backend;
        seed: train.seed, keys the fresh parameters; meta: build on the meta device (see the class)."""
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        register_attention()
        self.attention = attention
        self.seed = seed
        on_meta = torch.device("meta") if meta else contextlib.nullcontext()
        self.vision = VisionTower(cfg.vision_path, cfg.select_layer, meta=meta)
        llm_kw = dict(dtype=torch.float32, attn_implementation=f"fastross_{attention}")
        if meta:
            with on_meta:
                self.llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.llm_path), **llm_kw)
        else:
            self.llm = AutoModelForCausalLM.from_pretrained(cfg.llm_path, **llm_kw)
        self.llm.config.use_cache = False
        if cfg.liger_kernels:
            liger.apply(self.llm)
        self.text_loss = text_loss.build(cfg.fused_ce)
        self.ce_all = cfg.ce_positions == "all"
        hidden = self.llm.config.hidden_size
        # Where each pretrained part's weights live: (prefix here, folder, the files' key prefix).
        self.sources = [load.Source("vision.", cfg.vision_path, "vision_model."), load.Source("llm.", cfg.llm_path, "")]
        self.vae = None
        if cfg.vae_path:
            from diffusers import AutoencoderKL

            if meta:
                with on_meta:
                    self.vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg.vae_path))
            else:
                self.vae = AutoencoderKL.from_pretrained(cfg.vae_path, torch_dtype=torch.float32)
            self.vae.requires_grad_(False)
            self.sources.append(load.Source("vae.", cfg.vae_path, ""))
            self.latent_channels = int(self.vae.config.latent_channels)
            self.latent_shift = float(self.vae.config.shift_factor or 0.0)
            self.latent_scale = float(self.vae.config.scaling_factor)
        else:
            self.latent_channels = cfg.latent_channels
            self.latent_shift, self.latent_scale = cfg.latent_shift, cfg.latent_scale
        d = cfg.denoiser
        impl = d.impl  # resolved for the device this model will run on ("auto" refused: fastross.build resolves it)
        with on_meta:
            self.projector = Projector(self.vision.hidden_size, hidden)
            self.denoiser = Denoiser(
                d.kind,
                hidden,
                d.width,
                d.depth,
                d.heads,
                self.vision.grid,
                channels=4 * self.latent_channels,
                impl=impl,
                dtype=d.dtype,
                repeat_cond=d.repeat_cond,
            )
            self.register_buffer("sqrt_ab", torch.empty(diffusion.NUM_STEPS), persistent=False)
            self.register_buffer("sqrt_1m_ab", torch.empty(diffusion.NUM_STEPS), persistent=False)
        self.eps_loss = diffusion.EPS_LOSSES[impl]  # chosen once: fused keyed-noise kernels or materialised noise
        self.replicas = d.replicas
        if not meta:
            for part in self.FRESH:
                init.apply_rules(getattr(self, part), getattr(self, part).init_rules(), seed, f"{part}.")
            self.reset_buffers()

    def fresh_rules(self) -> dict[str, init.Rule]:
        """The init rule of every fresh parameter, by its name in this model."""
        return {
            n: r for part in self.FRESH for n, r in init.prefixed(f"{part}.", getattr(self, part).init_rules()).items()
        }

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute this module's own buffers, which no file holds: the noise schedule (float64 -> fp32)."""
        ab = diffusion.cosine_alphas_cumprod()
        self.sqrt_ab.copy_(ab.sqrt())
        self.sqrt_1m_ab.copy_((1 - ab).sqrt())

    def load_weights(self, device: torch.device) -> load.LoadReport:
        """Materialise a meta-built model on `device` (after fully_shard: only this rank's shards) and fill it."""
        return load.load_sharded(self, self.sources, self.fresh_rules(), self.seed, device)

    @property
    def num_visual_tokens(self) -> int:
        return self.vision.num_tokens

    def hidden_states(self, mb) -> torch.Tensor:
        """The LLM's final hidden states (T, H), after its final norm, with the image tokens merged in."""
        llm = self.llm
        embeds = llm.get_input_embeddings()(mb.input_ids)  # (1, T, H)
        with torch.no_grad():
            feats = self.vision(mb.pixel_values)
        vis = self.projector(feats.to(self.projector[0].weight.dtype))
        # One vectorised scatter. A micro-batch without images carries a weight-0 dummy image
        # sample, so every micro-batch has the same graph and every rank the same collectives.
        # (index_copy on the batch-1 tensor itself: a view here would give a compiled first layer other guards)
        merged = embeds.index_copy(1, mb.visual_pos, vis.flatten(0, 1)[None].to(embeds.dtype))
        # fastross's attention keeps every packed sample to itself (fastross/model/attention.py)
        h = llm.model(
            inputs_embeds=merged,
            position_ids=mb.position_ids,
            attention_mask=None,
            use_cache=False,
            fastross_cu_seqlens=mb.cu_seqlens,
            fastross_max_seqlen=mb.max_seqlen,
            fastross_mask=build_mask(self.attention, mb.doc_ids),  # once, for all layers
        )
        return h.last_hidden_state[0]

    def forward(self, mb) -> LossSums:
        llm = self.llm
        h = self.hidden_states(mb)

        # lm_head belongs to the FSDP root, unsharded during this forward: a fused kernel sees the whole weight.
        head = llm.get_output_embeddings()
        if self.ce_all:  # model.ce_positions=all, the reference's: logits at every position, the unsupervised ignored
            targets = torch.full((h.shape[0],), text_loss.IGNORE, dtype=mb.text_targets.dtype, device=h.device)
            text = self.text_loss(h, head.weight, head.bias, targets.index_copy(0, mb.text_pos, mb.text_targets))
        else:
            text = self.text_loss(h.index_select(0, mb.text_pos), head.weight, head.bias, mb.text_targets)

        slots = mb.pixel_values.shape[0]  # real images, or the one dummy (weight 0)
        cond = h.index_select(0, mb.visual_pos).view(slots, self.num_visual_tokens, -1)
        cond = F.layer_norm(cond.float(), (cond.shape[-1],), eps=1e-5)
        per_image = self.recon_per_image(mb, cond)
        recon = (per_image * mb.image_weight).sum()
        return LossSums(text=text, recon=recon)

    def recon_per_image(self, mb, cond: torch.Tensor) -> torch.Tensor:
        """Per-image eps loss (n,) fp32 given the normed condition (n, N, H); ROSS_SPEC.md section 4.

        Both impls draw the same keyed noise (fastross.model.diffusion.EPS_LOSSES): `triton` inside its
        fused kernels, never stored; `torch` materialised, as the reference.
        """
        mean, std = self.latent_moments(mb)
        return self.eps_loss(
            self.denoiser,
            mean,
            std,
            mb.noise_keys,
            mb.t,
            self.sqrt_ab[mb.t],
            self.sqrt_1m_ab[mb.t],
            cond,
            self.latent_shift,
            self.latent_scale,
        )

    def latent_moments(self, mb) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and std (n, C, 2g, 2g) fp32: stored with the sample, or from the VAE."""
        if mb.latent_mean is not None:
            return mb.latent_mean.float(), mb.latent_std.float()
        if self.vae is None:
            raise RuntimeError("the shards hold no latent moments and model.vae_path is empty: set model.vae_path")
        return diffusion.latent_moments(self.vae, mb.pixel_values, self.vision.grid, self.vision.image_spec)

    def latent_x0(self, mb) -> torch.Tensor:
        """The reconstruction target x0 (n, N, 4C) with the keyed posterior draw, materialised (torch path)."""
        mean, std = self.latent_moments(mb)
        xi = diffusion.keyed_xi(mb.noise_keys, self.num_visual_tokens, 4 * self.latent_channels)
        return diffusion.latent_target(mean, std, xi, self.latent_shift, self.latent_scale)

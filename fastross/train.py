"""The training entry point.

    torchrun --nproc-per-node 8 -m fastross.train configs/7b.yaml [key.sub=value ...]
    python -m fastross.train configs/7b.yaml --check      # validate only; missing folders are warnings
    python -m fastross.train --help-config                # every config key: type, default, documentation

`Trainer.train_step` reads top to bottom: take the loader's finished micro-batches
(fastross.data.loader), agree on the global normalisers, forward/backward each micro-batch, clip,
step. A run folder that holds a checkpoint is resumed from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from fastross import build, checkpoint, config, distributed, flops, lifecycle, metrics, provenance
from fastross.data.images import ImageSpec
from fastross.data.loader import Loader, StepBatch
from fastross.data.packing_planner import attention_cost_tokens
from fastross.data.schema import ShardMeta, fingerprint_problem, tokenizer_fingerprint
from fastross.data.sources import check_shard_facts, open_sources
from fastross.data.stream import Position
from fastross.data.templates import load_tokenizer
from fastross.metrics import MetricsLogger
from fastross.model import attention
from fastross.model.ross import RossModel

NONFINITE = "nonfinite.jsonl"  # run_dir/: one line per skipped step, with its samples


class TrainingStopped(RuntimeError):
    """The run cannot usefully go on (train.max_bad_steps); the message says why and what to do."""


def finite_everywhere(losses: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """Whether every rank's losses and the global gradient norm are finite.

    One all-reduce and one host sync per step (the `.item()`): the price of never applying a NaN update
    (`python benchmarks/nonfinite.py` measures it). The norm is already global; the losses are each rank's own."""
    bad = torch.stack([(~torch.isfinite(losses)).any(), ~torch.isfinite(grad_norm)]).float()
    distributed.all_reduce_max(bad)
    return not bad.any().item()


def param_groups(model, trainable: list[str], lrs: dict[str, float], weight_decay: float) -> list[dict]:
    """AdamW's groups: one per trainable part, at the part's learning rate. With weight decay on, each part's 1-D
    parameters (biases and norm weights) go to a group of their own without it, as the reference's trainer leaves
    biases and LayerNorms out of the decay (its recipes use weight decay 0)."""
    groups = []
    for part in trainable:
        params = [p for p in getattr(model, part).parameters() if p.requires_grad]
        if not weight_decay:
            groups.append({"params": params, "lr": lrs[part], "name": part})
            continue
        decayed, flat = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
        groups += [
            g
            for g in (
                {"params": decayed, "lr": lrs[part], "name": part},
                {"params": flat, "lr": lrs[part], "name": f"{part}.no_decay", "weight_decay": 0.0},
            )
            if g["params"]
        ]
    return groups


def llm_attention_cost_tokens(llm) -> float:
    """The planner's attention cost scale for this LLM (fastross.data.packing_planner)."""
    c = llm.config
    params = sum(p.numel() for n, p in llm.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    return attention_cost_tokens(params, c.num_hidden_layers, c.hidden_size)


def run_steps(epochs: int, max_steps: int, per_epoch: int) -> int:
    """The run's length in optimizer steps: train.max_steps when set, whether it ends inside train.epochs or past them
    (the data goes on into further epochs, each a fresh order); else the epochs' steps."""
    return max_steps if max_steps else epochs * per_epoch


def steps_note(epochs: int, max_steps: int, per_epoch: int) -> str:
    """The run's length as the trainer says it at start (and --check): where train.max_steps and train.epochs differ,
    both numbers."""
    total, by_epochs = run_steps(epochs, max_steps, per_epoch), epochs * per_epoch
    note = f"{total} steps ({per_epoch}/epoch)"
    if max_steps and max_steps != by_epochs:
        note += (
            f": train.max_steps={max_steps} sets the length, {total / per_epoch:.2f} epochs "
            f"(train.epochs={epochs} alone gives {by_epochs} steps)"
        )
    return note


def check_shards(cfg: config.Config, model: RossModel, data: list[tuple[str, ShardMeta, str]]) -> None:
    """What each shard set (key, its ShardMeta, its name) says against the model, data.shards first: the grid, the
    image token, the latents and the VAE's constants, the tokenizer. Needs the model's architecture only (a meta build
    will do): the trainer runs it before loading any weight, and --check (`check_before_training`) runs it too."""
    ours_tok = None
    for key, meta, shards in data:
        if meta.grid != model.vision.grid:
            raise config.ConfigError(
                f"{key}: {shards} was converted for a {meta.grid}x{meta.grid} patch grid, "
                f"but model.vision_path has {model.vision.grid}x{model.vision.grid}: "
                "convert again with this vision tower"
            )
        vocab = model.llm.get_input_embeddings().num_embeddings
        if meta.image_token_id >= vocab:
            raise config.ConfigError(
                f"{key}: image token id {meta.image_token_id} is outside model.llm_path's vocabulary ({vocab})"
            )
        if not meta.latents and model.vae is None:
            raise config.ConfigError(
                f"{key}: {shards} holds no latent moments: set model.vae_path to encode images on the fly"
            )
        if meta.latents and meta.latent_channels != model.latent_channels:
            raise config.ConfigError(
                f"{key}: latents have {meta.latent_channels} channels, the model expects {model.latent_channels}"
            )
        ours_tok = ours_tok or tokenizer_fingerprint(load_tokenizer(cfg.model.llm_path))
        problem = fingerprint_problem(meta.tokenizer_fingerprint, ours_tok, f"{key}: {shards}", cfg.model.llm_path)
        if problem is not None:
            raise config.ConfigError(problem)
        if meta.latents:
            stored = (meta.latent_channels, meta.latent_shift, meta.latent_scale)
            ours = (model.latent_channels, model.latent_shift, model.latent_scale)
            # The held-out shards are checked after data.shards, whose constants the model holds by then.
            if (model.vae is not None or key != "data.shards") and stored != ours:
                theirs = f"model.vae_path {cfg.model.vae_path}" if model.vae is not None else "data.shards"
                raise config.ConfigError(
                    f"{key}: {shards}'s latents were made by a VAE with (channels, shift, scale) {stored}, but "
                    f"{theirs} has {ours}: use that VAE or convert again"
                )
            # The targets are built with the constants of the VAE that made the stored moments, whatever the config.
            model.latent_shift, model.latent_scale = meta.latent_shift, meta.latent_scale


def check_before_training(cfg: config.Config) -> list[str]:
    """--check's share of the trainer's start: every check it makes before training that needs no weights and no
    ranks. The model built on the meta device from the folders' config.json files (no weight read), the image
    processor, the data sources opened and compared field by field (fastross.data.sources.check_agree: template,
    tokenizer, grid, latents...) without hashing their shard files, and `check_shards` on them. Returns notes (the
    run's length, samples planned alone) to print; raises ConfigError, ValueError or FileNotFoundError."""
    model = build.meta(cfg.model, "sdpa", "cpu", seed=cfg.train.seed)  # the architecture: its ops never run here
    ImageSpec.from_pretrained(cfg.model.vision_path)
    d, t = cfg.data, cfg.train
    sources = open_sources(d, check=False)
    data = [("data.shards", sources[0].meta, ", ".join(s.name for s in sources))]
    if d.eval_shards:
        held = open_sources(dataclasses.replace(d, shards=d.eval_shards, sources=[]), check=False)
        data.append(("data.eval_shards", held[0].meta, held[0].name))
    check_shards(cfg, model, data)
    lengths = np.concatenate([s.lengths for s in sources])
    per_epoch = len(lengths) // d.global_batch  # StepStream's epoch: the union of the sources
    if per_epoch == 0:
        raise config.ConfigError(
            f"data.global_batch={d.global_batch} is larger than the {len(lengths)} samples of {data[0][2]}"
        )
    notes = [steps_note(t.epochs, t.max_steps, per_epoch)]
    too_long = int((lengths > d.max_tokens).sum())
    if too_long:
        notes.append(
            f"{too_long} of {len(lengths)} samples are longer than data.max_tokens={d.max_tokens}: each is "
            "planned alone in its micro-batch"
        )
    return notes


class Trainer:
    """One run: `__init__` calls the builders, in the order a start needs them (as torchtitan's trainer does);
    `fit` runs the steps, `train_step` reads top to bottom."""

    def __init__(self, cfg: config.Config, world: distributed.World):
        self.cfg, self.world = cfg, world
        self.run_dir = Path(cfg.train.run_dir)
        self.metrics = self.build_metrics()
        torch.manual_seed(cfg.train.seed)
        # Built on the meta device: no rank ever holds the whole model (fastross.build, fastross/model/load.py).
        model = self.build_meta_model()
        self.loader, self.eval_loader = self.build_loaders(model)
        self.arch, self.policies = self.build_flops(model)
        self.model = self.build_model(model)
        self.optimizer, self.params = self.build_optimizer()
        self.total_steps, self.scheduler = self.build_schedule()
        self.checkpointer = checkpoint.Checkpointer(
            self.run_dir, world.rank, cfg.train.keep_checkpoints, cfg.train.async_checkpoint
        )
        self.resume()
        self.write_provenance()
        self._say(self.start_note())

    def build_metrics(self) -> MetricsLogger:
        """The run folder and its records; the CUDA allocator's history from here when train.memory_snapshot."""
        cfg, world, t = self.cfg, self.world, self.cfg.train
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        logger = MetricsLogger(
            self.run_dir,
            world.is_main,
            world.size,
            device=world.device,
            loggers=t.loggers,
            wandb_project=t.wandb_project,
            config=config.to_dict(cfg),
            progress=sys.stdout.isatty(),
        )
        if t.memory_snapshot:
            if world.device.type != "cuda":
                raise config.ConfigError(
                    f"train.memory_snapshot records the CUDA allocator, and this run is on {world.device.type}: "
                    "set it to false"
                )
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)  # from before the weights load
        self.recording_memory = t.memory_snapshot
        return logger

    def build_meta_model(self) -> RossModel:
        """The architecture on the meta device (fastross.build.meta), attention.backend and model.denoiser.impl
        resolved for this run's device: what the loaders and the checks need, before any weight is read."""
        cfg, world = self.cfg, self.world
        if cfg.data.global_batch < world.size:
            raise config.ConfigError(
                f"data.global_batch={cfg.data.global_batch} is smaller than the {world.size} ranks"
            )
        backend = attention.resolve(cfg.attention.backend, world.device)
        return build.meta(cfg.model, backend, world.device.type, seed=cfg.train.seed)

    def build_loaders(self, model: RossModel) -> tuple[Loader, Loader | None]:
        """The training loader and, with data.eval_shards, the held-out one (Trainer.evaluate: the same planner and
        collator, in the shards' order); what each says at start; what their shards say against the model."""
        d, m, t, world = self.cfg.data, self.cfg.model, self.cfg.train, self.world

        def loader(data: config.DataConfig) -> Loader:
            return Loader(
                data,
                rank=world.rank,
                world=world.size,
                attn_tokens=llm_attention_cost_tokens(model.llm),
                image=ImageSpec.from_pretrained(m.vision_path),
                latent_channels=model.latent_channels,
                replicas=m.denoiser.replicas,
                seed=t.seed,
                device=world.device,
            )

        train = loader(d)
        if world.size > 1:  # every rank must leave out the same samples (each node may hold its own copy of the shards)
            skipped = train.skipped_samples
            spread = torch.tensor([skipped, -skipped], device=world.device)
            torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
            if spread[0] != -spread[1]:
                raise config.ConfigError(
                    f"data.shards: the ranks found different corrupt shards in {train.name} ({skipped} samples "
                    f"skipped on rank {world.rank}): repair the copies so that every rank reads the same data"
                )
        for note in train.notes():
            self._say(note)
        held = None
        if d.eval_shards:
            held = loader(dataclasses.replace(d, shards=d.eval_shards, sources=[], shuffle="none"))
        # What the shards say against the model (the sources agree already: open_sources); --check runs the same
        check_shards(
            self.cfg,
            model,
            [("data.shards", train.meta, train.name)] + ([("data.eval_shards", held.meta, held.name)] if held else []),
        )
        return train, held

    def build_flops(self, model: RossModel) -> tuple[flops.Arch, list[str]]:
        """What a step costs (fastross.flops), from the built architecture: model FLOPs for MFU, hardware FLOPs with
        the checkpointing policy's recompute; the device's peak for MFU."""
        t = self.cfg.train
        arch = flops.Arch.of(model)
        policies = config.checkpoint_policies(t.activation_checkpointing, arch.llm_layers)
        self.metrics.peak_tflops, peak_from = flops.peak_tflops(t.peak_tflops, self.world.device)
        self._say(f"MFU against {self.metrics.peak_tflops:.3g} TFLOP/s per device ({peak_from})")
        self._work = [0, 0]  # the global batches' tokens and squared lengths since the last record (host ints)
        self._counts = torch.zeros(2, device=self.world.device)  # and their supervised tokens and images (no host sync)
        return arch, policies

    def build_model(self, model: RossModel) -> RossModel:
        """The meta-built model frozen, parallelized and loaded (fastross.build): each rank's shards only."""
        build.freeze(model, self.cfg.train.trainable)
        model = build.parallelize(model, self.world, self.cfg)
        loaded = build.load(model, self.world.device, self.cfg)
        r = loaded.report
        self._say(
            f"weights: {r.from_files} tensors read from the folders, {r.fresh} fresh; "
            f"{r.held_bytes / 2**20:.1f} MiB held per rank"
        )
        if loaded.init_from is not None:
            self._say(f"model weights from {loaded.init_from}")
        return model

    def build_optimizer(self) -> tuple[torch.optim.AdamW, list]:
        """AdamW over the trainable parts' groups (`param_groups`); the parameters it steps, for clipping."""
        o, t = self.cfg.optim, self.cfg.train
        lrs = {"projector": o.lr_projector, "denoiser": o.lr_denoiser, "llm": o.lr_llm}
        groups = param_groups(self.model, t.trainable, lrs, o.weight_decay)
        # One fused kernel per parameter group on GPUs; the multi-tensor (foreach) path elsewhere.
        fused = self.world.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=fused, foreach=not fused
        )
        return optimizer, [p for g in groups for p in g["params"]]

    def build_schedule(self):
        """The run's length in steps and its learning-rate schedule: linear warm-up from 0, then cosine decay to 0,
        the reference's schedule, the same learning rates to the last bit as fastross's own formula had
        (tests/test_config.py)."""
        t = self.cfg.train
        total = run_steps(t.epochs, t.max_steps, self.loader.steps_per_epoch)
        warmup = math.ceil(self.cfg.optim.warmup_ratio * total)
        return total, get_cosine_schedule_with_warmup(self.optimizer, warmup, total)

    def resume(self) -> None:
        """From the run folder's latest checkpoint when it holds one (files vetted first), else from step 0; the
        records of steps about to run again dropped."""
        self.step, self.data_position = 0, Position()
        self.bad_in_a_row = self.skipped_steps = self._skipped_logged = 0  # non-finite steps (Trainer._skip)
        latest = self.checkpointer.latest()
        if latest is not None:
            state = self.checkpointer.load(latest, self.model, self.optimizer, self.scheduler)  # files vetted first
            self.data_position = Position(**state["data"])
            self.step = state["step"]
            self.bad_in_a_row = state.get("bad_in_a_row", 0)
            self._say(f"resumed from {latest} at step {self.step}")
        # also without a checkpoint: an early kill's records are of steps about to run again
        note = self.metrics.drop_after(self.step)
        if note is not None:
            self._say(note)

    def write_provenance(self) -> None:
        """The resolved config (its paths absolute: config.load) and where the code came from, beside the records."""
        if self.world.is_main:
            (self.run_dir / "config.yaml").write_text(config.dump(self.cfg))
            provenance.write(self.run_dir)

    def start_note(self) -> str:
        """The line a start ends with: ranks, packing, the resolved attention and denoiser ops, the length, what
        trains."""
        cfg, world, t = self.cfg, self.world, self.cfg.train
        n = sum(p.numel() for p in self.params)
        return (
            f"{world.size} rank(s) on {world.device.type}, {cfg.data.global_batch} samples/step packed into "
            f"micro-batches of <= {cfg.data.max_tokens} tokens, attention {self.model.attention}, "
            f"denoiser {self.model.denoiser.impl}, {steps_note(t.epochs, t.max_steps, self.loader.steps_per_epoch)}, "
            f"training {', '.join(t.trainable)} ({n / 1e6:.2f}M params, this rank's shards)"
        )

    def _say(self, msg: str) -> None:
        if self.world.is_main:
            self.metrics.say(f"train: {msg}")

    def train_step(self, step: StepBatch) -> dict:
        cfg, device = self.cfg, self.world.device
        # The loader's finished micro-batches, already on the device; every rank runs the same
        # number of them (the plan pads with empty ones).
        mbs, self.data_position = step.micro_batches, step.position

        # The global normalisers (ROSS_SPEC.md section 5): supervised tokens and images of
        # the whole global batch, all micro-batches and all ranks.
        counts = torch.tensor(
            [sum(b.num_text_tokens for b in mbs), sum(b.num_images for b in mbs)], dtype=torch.float32, device=device
        )
        distributed.all_reduce_sum(counts)
        self._counts += counts
        self._work[0] += step.tokens
        self._work[1] += step.tokens_sq
        n_text, n_img = counts[0].clamp(min=1), counts[1].clamp(min=1)

        sums = torch.zeros(2, device=device)
        losses = []  # per micro-batch: which one went non-finite
        for mb in mbs:
            out = self.model(mb)  # on the device already (fastross.data.loader)
            # Already the global mean: FSDP sums the ranks' gradients (distributed.parallelize).
            loss = out.text / n_text + cfg.model.recon_weight * out.recon / n_img
            loss.backward()
            losses.append(torch.stack([out.text.detach(), out.recon.detach()]))
            sums += losses[-1]
        losses = torch.stack(losses)

        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor under FSDP
        if not finite_everywhere(losses, grad_norm):  # the step's one host sync
            self._skip(mbs, losses, grad_norm)
        else:
            self.optimizer.step()
            self.bad_in_a_row = 0
        self.scheduler.step()  # the schedule follows the run's steps, skipped ones included
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {
            "sums": sums,
            "counts": counts,
            "grad_norm": grad_norm,
            "tokens": step.tokens,  # the global batch's tokens, known to every rank
            "micro_batches": step.num_micro_batches,
            "imbalance": step.imbalance,
        }

    def _skip(self, mbs: list, losses: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """No update (the optimizer's moments and step count untouched); the step's samples go to
        run_dir/nonfinite.jsonl: those of the micro-batches whose loss is not finite, else all of this rank's."""
        bad_mb = (~torch.isfinite(losses)).any(1).tolist()
        if not any(bad_mb):  # the norm alone: every micro-batch contributed to it
            bad_mb = [True] * len(mbs)
        mine = [i for mb, bad in zip(mbs, bad_mb) if bad for i in mb.sample_ids]
        every = distributed.gather_to_main(mine, self.world)
        self.bad_in_a_row += 1
        self.skipped_steps += 1
        step, norm = self.step + 1, float(grad_norm)
        if self.world.is_main:
            samples = sorted({i for ids in every for i in ids})
            rec = {"step": step, "grad_norm": norm, "samples": samples}
            metrics.append_line(self.run_dir / NONFINITE, json.dumps(rec))
            self._say(
                f"step {step}: non-finite loss or gradient norm (grad_norm {norm}); update skipped "
                f"({self.bad_in_a_row} in a row, train.max_bad_steps={self.cfg.train.max_bad_steps}); "
                f"samples {samples} in {self.run_dir / NONFINITE}"
            )
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            names = sorted({i for ids in every for i in ids}) if self.world.is_main else []
            raise TrainingStopped(
                f"{self.bad_in_a_row} steps in a row (through step {step}) had a non-finite loss or gradient norm "
                f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); the last one's samples: {names}; every "
                f"skipped step's samples are in {self.run_dir / NONFINITE}. Check those samples (or lower the learning "
                "rate) and start the run again: it resumes from its last checkpoint"
            )

    def log(self, result: dict, lr: float) -> None:
        sums = distributed.all_reduce_sum(result["sums"])
        counts = result["counts"].clamp(min=1)
        grad_norm = result["grad_norm"]
        text, recon = (sums / counts).tolist()  # host sync: logging steps only
        n_text, n_img = (int(x) for x in self._counts.tolist())
        work = flops.totals_flops(self.arch, *self._work, n_img, n_text, self.cfg.train.trainable, self.policies)
        self._work, self._counts = [0, 0], torch.zeros_like(self._counts)
        self.metrics.log(
            self.step,
            self.total_steps,
            {
                "recompute": work.recompute,  # hardware over model FLOPs (the checkpointing policy's recompute)
                "text_loss": text,
                "recon_loss": recon,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "text_tokens": int(result["counts"][0]),
                "images": int(result["counts"][1]),
                "micro_batches": result["micro_batches"],
                "rank_imbalance": result["imbalance"],
                "skipped_steps": self.skipped_steps - self._skipped_logged,  # non-finite steps since the last record
            },
            flops=work.model_total,
        )  # the global batches' model FLOPs since the last record
        self._skipped_logged = self.skipped_steps

    def fit(self) -> None:
        t = self.cfg.train
        end = min(t.stop_after, self.total_steps) if t.stop_after else self.total_steps
        if self.step >= end:
            self._say(
                f"already complete: {self.step}/{self.total_steps} steps in {self.run_dir}"
                + (f" (train.stop_after={t.stop_after})" if end < self.total_steps else "")
            )
            # A run killed after its last checkpoint was final (while pruning) is done: said as a finished run says it.
            self._say(f"done: steps {self.step} -> {self.step} in 0.0 s; checkpoint in {self.checkpointer.hint()}")
            return
        self.model.train()
        self.model.vision.eval()
        start, first = time.perf_counter(), self.step
        cuda = self.world.device.type == "cuda"
        pr = t.profile
        prof = (
            metrics.profiler(
                pr.wait, pr.warmup, pr.active, pr.repeat, self.run_dir, self.world.rank, first, self.world.device
            )
            if pr.active
            else None
        )
        self.metrics.start(first, self.total_steps)
        try:
            if prof is not None:
                prof.start()
            for batch in self._timed(self.loader.steps(self.data_position, self.step, end)):
                lr = self.scheduler.get_last_lr()[0]
                t0 = time.perf_counter()
                result = self.train_step(batch)
                log_now = self.step % t.log_every == 0 or self.step == end
                if log_now and cuda:
                    torch.cuda.synchronize()  # host sync: logging steps only, so that compute_s holds the GPU's work
                self.metrics.add("compute_s", time.perf_counter() - t0)
                self.metrics.count(self.cfg.data.global_batch, result["tokens"])
                if prof is not None:
                    prof.step()
                # Log before saving: a checkpoint of step N implies its record is written. A save's
                # blocked time therefore goes on the next record (the last save's: console only).
                if log_now:
                    self.log(result, lr)
                    if self.recording_memory:
                        self._dump_memory_snapshot()
                if t.eval_every and self.step % t.eval_every == 0:
                    self.evaluate()
                if t.ckpt_every and (self.step % t.ckpt_every == 0 or self.step == end):
                    self.save()
            waited = self.checkpointer.close()  # the last checkpoint is complete before the run says done
        finally:
            if prof is not None:
                prof.stop()
            self.metrics.close()
        if self.cfg.train.async_checkpoint:
            self._say(f"waited {waited:.2f} s at the end for the last checkpoint's write")
        wall = time.perf_counter() - start
        self._say(f"done: steps {first} -> {self.step} in {wall:.1f} s; checkpoint in {self.checkpointer.hint()}")

    @torch.no_grad()
    def evaluate(self) -> None:
        """Both losses over the whole held-out set (data.eval_shards), normalised as training's (ROSS_SPEC.md section
        5) over all of it. Its steps are always 0..K-1 of its own loader, and a step's batches, noise keys and timesteps
        are functions of its index (fastross.data.loader): every evaluation sees the same noise, so the curve compares
        across steps. No random state is drawn: training's losses are those of a run without evaluation."""
        t0, device = time.perf_counter(), self.world.device
        sums, counts = torch.zeros(2, device=device), torch.zeros(2, device=device)
        loader = self.eval_loader
        for step in loader.steps(Position(), 0, loader.steps_per_epoch):
            for mb in step.micro_batches:
                out = self.model(mb)
                sums += torch.stack([out.text.float(), out.recon.float()])
                counts += torch.tensor([mb.num_text_tokens, mb.num_images], dtype=torch.float32, device=device)
        distributed.all_reduce_sum(sums)
        distributed.all_reduce_sum(counts)
        text, recon = (sums / counts.clamp(min=1)).tolist()  # host sync: evaluation steps only
        self.metrics.log_eval(
            self.step,
            {"text_loss": text, "recon_loss": recon, "samples": loader.steps_per_epoch * self.cfg.data.global_batch},
            time.perf_counter() - t0,
        )

    def _timed(self, steps):
        """The loader's steps, with the time spent waiting in next() added to the record as data_wait_s."""
        while True:
            t0 = time.perf_counter()
            batch = next(steps, None)
            if batch is None:
                return
            self.metrics.add("data_wait_s", time.perf_counter() - t0)
            yield batch

    def _dump_memory_snapshot(self) -> None:
        """The allocator's history up to the first record (model load and the first steps, where the peak is set);
        recording stops here, so the rest of the run pays nothing for it."""
        path = self.run_dir / f"memory_snapshot_rank{self.world.rank}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        self.recording_memory = False
        self._say(f"CUDA memory snapshot in {path} (open it at pytorch.org/memory_viz)")

    def save(self) -> None:
        state = {
            "step": self.step,
            "data": self.data_position.to_dict(),
            "scheduler": self.scheduler.state_dict(),
            "world_size": self.world.size,
            "bad_in_a_row": self.bad_in_a_row,
        }
        saved = self.checkpointer.save(self.step, self.model, self.optimizer, state, config.dump(self.cfg))
        self.metrics.add("ckpt_blocked_s", saved.blocked_s)
        how = "staged (writing in the background)" if self.cfg.train.async_checkpoint else "written"
        self._say(f"checkpoint {saved.path.name} {how}; the step was blocked {saved.blocked_s:.3f} s")


class HelpConfig(argparse.Action):
    """--help-config: prints every config key, as --help prints the options, and exits."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(config.describe())
        parser.exit()


def check(path: str, overrides: list[str]) -> int:
    """--check: the resolved config (bases merged, overrides applied, paths absolute) on stdout, each missing folder
    as a warning on stderr; exit 0 unless the config itself is wrong."""
    try:
        cfg, missing = config.check(path, overrides)
    except config.ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2
    notes = []
    if not missing:  # what the trainer checks before training, short of the weights (check_before_training)
        try:
            check_shard_facts(cfg.data)
            notes = check_before_training(cfg)
        except (config.ConfigError, ValueError, FileNotFoundError) as e:
            print(f"train: config error: {e}", file=sys.stderr)
            return 2
    print(config.dump(cfg), end="")
    for msg in missing:
        print(f"train: warning: {msg}", file=sys.stderr)
    for msg in notes:
        print(f"train: {msg}", file=sys.stderr)
    unchecked = " (what the folders hold is checked once they all exist)" if missing else ""
    print(f"train: {path}: config valid, {len(missing)} missing folder(s){unchecked}", file=sys.stderr)
    return 0


def usage() -> str:
    """What `python -m fastross.train` without arguments prints: the command's form and the recipes in configs/."""
    folder = next(
        (f for f in (Path.cwd() / "configs", Path(__file__).resolve().parents[1] / "configs") if f.is_dir()), None
    )
    recipes = sorted(folder.glob("*.yaml")) if folder else []
    lines = [
        "usage: [torchrun --nproc-per-node N] python -m fastross.train CONFIG [key.sub=value ...] [--check]",
        "       python -m fastross.train --help-config      (every key)",
    ]
    if recipes:
        lines.append(f"recipes in {folder}: " + ", ".join(p.name for p in recipes))
    lines.append("e.g. python -m fastross.train configs/tiny.yaml --check")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Train a ROSS model (see configs/ and README.md).",
        epilog="Every config key, with its type, default and meaning: --help-config.",
    )
    p.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=10")
    p.add_argument(
        "--help-config",
        action=HelpConfig,
        nargs=0,
        help="list every config key (dotted name, type, default, meaning) and exit",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the config and exit without training; missing model and data folders are warnings",
    )
    a = p.parse_intermixed_args(argv)  # options may follow the overrides: CONFIG key=value --check
    if a.config is None:
        print(usage(), file=sys.stderr)
        return 2
    if a.check:
        return check(a.config, a.overrides)
    try:
        cfg = config.load(a.config, a.overrides)
        check_shard_facts(cfg.data)  # what the shards say against data.*, before any work
    except config.ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2
    world = distributed.init()
    try:
        # One trainer per run folder (fastross.lifecycle): taken before anything is written into it.
        with lifecycle.hold(cfg.train.run_dir, world.is_main, distributed.broadcast_from_main):
            if world.local_rank == 0:  # once per machine
                lifecycle.clean_dead_streaming_shm()
                lifecycle.clean_dead_multiprocessing_dirs()
            Trainer(cfg, world).fit()
    except config.ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"train: stopped: {e}", file=sys.stderr)
        return 3
    except lifecycle.RunLocked as e:
        print(f"train: refused: {e}", file=sys.stderr)
        return 4
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

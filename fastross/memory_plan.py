"""Plan a run from architectures alone: FLOPs by part, per-GPU peak memory by simulation, a checkpointing policy.

    python -m fastross.memory_plan CONFIG --gpus N [--gpu-gib 80] [key.sub=value ...]

Needs no weights and no data: architectures come from the model folders' config.json when they exist,
else from fastross.model.presets; the sample mix from the shards' length indexes when `data.shards` (or every
source of `data.sources`, drawn by weight) holds one, else the stated default stage-2 mix
(fastross.data.default_mix.draw).
Memory is simulated on the CPU: the recipe's RossModel built on the meta device, parallelized as the trainer does
(checkpointing, FSDP2 over a fake process group of N ranks), materialised as fake tensors, and one training step
tracked by FSDPMemTracker on the step's largest micro-batch (one untracked step first: AdamW's state created inside
the tracked region is reported ~27x too large, CPU_AND_GPU.md).

The planner picks the per-layer policy (train.activation_checkpointing) with the least recompute R
(hardware / model FLOPs, fastross.flops) whose simulated peak fits the device less MARGIN.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fastross import build, config, distributed, flops
from fastross.data import default_mix, packing_planner
from fastross.data.batch import MicroBatch
from fastross.data.remote import cache_folder, is_remote
from fastross.data.schema import LENGTHS_FILE, read_lengths
from fastross.model import presets

GIB = 1 << 30
# Kept free of the device's memory: CUDA context and NCCL buffers (2 GiB), and the caching allocator's
# fragmentation (10% of the device).
MARGIN_FIXED_GIB, MARGIN_SHARE = 2.0, 0.10
SUPERVISED_SHARE = 0.5  # supervised share of a sample's text tokens when the index does not say (assistant answers)


@dataclass
class Mix:
    lengths: np.ndarray  # tokens per sample, visual tokens included
    images: np.ndarray  # bool
    supervised: np.ndarray  # supervised tokens per sample
    source: str


def length_indexes(d: config.DataConfig) -> list[tuple[Path, float]]:
    """(lengths.npy, weight) of every source, a remote's from its cache; [] unless every source has one here."""
    found = []
    for s in config.data_sources(d):
        folder = cache_folder(d.cache_dir, s.shards) if is_remote(s.shards) else Path(s.shards)
        if not s.shards or not (folder / LENGTHS_FILE).is_file():
            return []
        found.append((folder / LENGTHS_FILE, s.weight))
    return found


def sample_mix(cfg: config.Config, visual_tokens: int, seed: int = 0) -> Mix:
    """One global batch of samples: drawn from the sources' length indexes by weight (as the trainer's mixture
    draws them), or from the default stage-2 mix."""
    rng = np.random.default_rng(seed)
    n = cfg.data.global_batch
    indexes = length_indexes(cfg.data)
    if indexes:
        weights = np.array([w for _, w in indexes])
        pick = rng.choice(len(indexes), n, p=weights / weights.sum()) if len(indexes) > 1 else np.zeros(n, int)
        lengths = np.zeros(n, np.int64)
        for k, (index, _) in enumerate(indexes):
            at = np.flatnonzero(pick == k)
            lengths[at] = rng.choice(read_lengths(index.parent).astype(np.int64), len(at))  # verified
        images = lengths > visual_tokens  # the index holds total lengths only: longer than an image means one
        source = f"{n} samples drawn from " + ", ".join(
            f"{index} (weight {w:g})" if len(indexes) > 1 else str(index) for index, w in indexes
        )
    else:
        lengths, images = default_mix.draw(rng, n, visual_tokens)
        source = f"{n} samples of the default stage-2 mix (fastross/data/default_mix.py)"
    text = lengths - images * visual_tokens
    return Mix(lengths, images, np.maximum(1, (text * SUPERVISED_SHARE).astype(np.int64)), source)


def largest_micro_batch(m: Mix, gpus: int, max_tokens: int, attn_tokens: float) -> list[int]:
    """The samples of the step's largest micro-batch (most tokens, then most images) as the trainer packs them."""
    plan = packing_planner.plan_step(m.lengths.tolist(), gpus, max_tokens, attn_tokens)
    bins = [b for rank in plan.micro_batches for b in rank]
    return max(bins, key=lambda b: (int(m.lengths[b].sum()), int(m.images[b].sum())))


def step_micro_batch(cfg: config.Config, m: Mix, gpus: int, attn_tokens: float) -> tuple[list, list, list]:
    """(lengths, images, supervised) of the step's largest micro-batch as the config builds it: packed
    (`largest_micro_batch`), or data.packing=padded, where every sample of a micro-batch of data.padded_samples
    is padded to the longest of them (fastross.data.batch.pack_text: the padding is unsupervised)."""
    if cfg.data.packing == "packed":
        mb = largest_micro_batch(m, gpus, cfg.data.max_tokens, attn_tokens)
        return m.lengths[mb].tolist(), m.images[mb].tolist(), m.supervised[mb].tolist()
    plan = packing_planner.plan_padded_step(m.lengths.tolist(), gpus, cfg.data.padded_samples, attn_tokens)
    mb = max(
        (b for rank in plan.micro_batches for b in rank),
        key=lambda b: (len(b) * int(m.lengths[b].max()), int(m.images[b].sum())),
    )
    return [int(m.lengths[mb].max())] * len(mb), m.images[mb].tolist(), m.supervised[mb].tolist()


@dataclass
class Memory:
    """A rank's simulated peak and its parts (bytes)."""

    peak: int
    parts: dict[str, int]  # parameters, gradients, optimizer, activations, temporaries
    kinds: dict[
        str, int
    ]  # FSDPMemTracker's own kinds at the peak ("Sharded Param", "OptState", ...; frozen parts not included)


def _fake_micro_batch(model, lengths, images, supervised):
    """A MicroBatch of these samples, real small tensors (the fake mode converts): stored latent moments, or none
    when the model has a VAE (model.vae_path: the reference's encoding on the fly)."""
    n_vis = model.num_visual_tokens
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    vpos = np.concatenate([cu[i] + np.arange(n_vis) for i in range(len(lengths)) if images[i]] or [np.arange(n_vis)])
    tpos = np.concatenate([cu[i] + np.arange(k) for i, k in enumerate(supervised)])
    n_img = max(1, int(sum(images)))
    size, g, c = model.vision.image_size, model.vision.grid, model.latent_channels
    total = int(cu[-1])
    return MicroBatch(
        input_ids=torch.zeros(1, total, dtype=torch.long),
        position_ids=torch.from_numpy(np.concatenate([np.arange(x) for x in lengths]))[None],
        cu_seqlens=torch.from_numpy(cu),
        doc_ids=torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths)),
        max_seqlen=int(max(lengths)),
        text_pos=torch.from_numpy(tpos),
        text_targets=torch.zeros(len(tpos), dtype=torch.long),
        visual_pos=torch.from_numpy(vpos),
        pixel_values=torch.zeros(n_img, 3, size, size),
        image_weight=torch.ones(n_img),
        t=torch.zeros(n_img, model.replicas, dtype=torch.long),
        noise_keys=torch.arange(1, n_img + 1),
        latent_mean=None if model.vae is not None else torch.zeros(n_img, c, 2 * g, 2 * g),
        latent_std=None if model.vae is not None else torch.ones(n_img, c, 2 * g, 2 * g),
        num_images=int(sum(images)),
        num_text_tokens=len(tpos),
    )


class _ChunkedLinearCE(torch.autograd.Function):
    """Liger's fused linear CE in plain torch, for the fake mode (Triton cannot run there): the same chunks
    (rows / ceil(V / H), to a power of two), each chunk's logits and gradients formed in forward, only the
    gradients of hidden and the fp32 weight gradient kept. Used only to simulate memory."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        k, h = hidden.shape
        chunk = 1 << math.ceil(math.log2(max(1, math.ceil(k / math.ceil(weight.shape[0] / h)))))
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, k, chunk):
            x = hidden[i : i + chunk]
            logits = (x @ weight.t()).float()
            loss = loss + torch.nn.functional.cross_entropy(logits, targets[i : i + chunk], reduction="sum")
            g = logits.softmax(-1)
            grad_h[i : i + chunk] = g.to(weight.dtype) @ weight
            grad_w += g.t() @ x.float()
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, (grad_w * grad_out).to(grad_h.dtype), None


class _FusedCEStandIn(torch.nn.Module):
    def forward(self, hidden, weight, bias, targets):
        return _ChunkedLinearCE.apply(hidden, weight, targets)


def init_fake_world(gpus: int) -> distributed.World:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=gpus, store=FakeStore())
    return distributed.World(0, gpus, 0, torch.device("cpu"))


def simulate(
    cfg: config.Config, model_cfg, world: distributed.World, policy, samples: tuple, device: str = "cuda"
) -> Memory:
    """Rank 0's peak over one tracked training step of the micro-batch `samples` = (lengths, images, supervised),
    with train.activation_checkpointing = policy; model_cfg's folders hold config.json (presets.arch_folders);
    device: the type of device planned for (what model.denoiser.impl=auto resolves to). The model is built as the
    trainer builds it (fastross.build), fake tensors in place of its weights."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    t = dataclasses.replace(cfg.train, activation_checkpointing=policy, compile=False)
    model = build.meta(model_cfg, "varlen", device, seed=t.seed)
    if model_cfg.fused_ce:
        model.text_loss = _FusedCEStandIn()
    build.freeze(model, t.trainable)
    build.parallelize(model, world, dataclasses.replace(cfg, train=t))
    with build.fake(model, t.dtype):
        params = [p for part in t.trainable for p in getattr(model, part).parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
        mb = _fake_micro_batch(model, *samples)

        def step():
            out = model(mb)
            (out.text + out.recon).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # AdamW's state exists before tracking
        tracker = FSDPMemTracker(model, opt)
        tracker.track_inputs((mb,))
        with tracker:
            step()
        snap = tracker.get_tracker_snapshot("peak")
    by = {getattr(k, "value", k): v for k, v in next(iter(snap.values())).items()}
    groups = {
        "parameters": ("Sharded Param", "Unsharded Param", "Buffer"),
        "gradients": ("Sharded Grad", "Unsharded Grad"),
        "optimizer": ("OptState",),
        "activations": ("Activation", "Inputs"),
        "temporaries": ("Temp", "All Gather", "Reduce Scatter"),
    }
    parts = {name: sum(by.get(k, 0) for k in keys) for name, keys in groups.items()}
    # The frozen parts (vision tower, VAE) are out of FSDP (ignored_params): the tracker does not see them, but
    # every rank holds them whole for the whole step.
    frozen = sum(p.numel() * p.element_size() for part in distributed.frozen_parts(model) for p in part.parameters())
    parts["parameters"] += frozen
    unknown = set(by) - {k for keys in groups.values() for k in keys} - {"Total"}
    if unknown:
        raise RuntimeError(
            f"FSDPMemTracker reported memory kinds fastross.memory_plan does not group: {sorted(unknown)}"
        )
    return Memory(by["Total"] + frozen, parts, by)


def budget_gib(gpu_gib: float) -> float:
    """What a rank may use: the device less MARGIN_FIXED_GIB and MARGIN_SHARE of it."""
    return gpu_gib * (1 - MARGIN_SHARE) - MARGIN_FIXED_GIB


def override(policies: list[str]) -> str:
    """One policy per layer -> the train.activation_checkpointing value: [full]*28 -> full; runs -> [full*8,none*20]."""
    runs = [(name, len(list(group))) for name, group in itertools.groupby(policies)]
    if len(runs) == 1:
        return runs[0][0]
    return "[" + ",".join(name if n == 1 else f"{name}*{n}" for name, n in runs) + "]"


def choose_policy(layers: int, base: float, per_sel: float, per_none: float, budget: float, recompute) -> tuple:
    """(n_full, n_sel, n_none) with the least recompute(policies) whose predicted peak base + n_sel * per_sel +
    n_none * per_none fits the budget (ties: the smaller peak); None when not even all-full fits."""
    best = None
    for n_full in range(layers + 1):
        for n_sel in range(layers - n_full + 1):
            n_none = layers - n_full - n_sel
            peak = base + n_sel * per_sel + n_none * per_none
            if peak > budget:
                continue
            key = (round(recompute(["full"] * n_full + ["selective"] * n_sel + ["none"] * n_none), 6), peak)
            if best is None or key < best[0]:
                best = (key, (n_full, n_sel, n_none))
    return None if best is None else best[1]


@dataclass
class Setup:
    """What simulating one config needs: its model config (folders holding config.json), the fake world of `gpus`
    ranks, the architecture's counts, the step's sample mix and its largest micro-batch as the config builds it."""

    cfg: config.Config
    model_cfg: config.ModelConfig
    world: distributed.World
    device: str  # the type of device planned for: what model.denoiser.impl=auto resolves to (fastross.build)
    arch: flops.Arch
    mix: Mix
    samples: tuple  # (lengths, images, supervised) of the simulated micro-batch
    sources: dict[str, str]
    sims: dict = dataclasses.field(default_factory=dict)

    def step(self, policies) -> flops.StepFlops:
        m = self.mix
        return flops.step_flops(self.arch, m.lengths, m.images, m.supervised, self.cfg.train.trainable, policies)

    def memory(self, policies) -> Memory:
        """The simulated peak with these per-layer policies (each policy simulated once)."""
        key = override(config.checkpoint_policies(policies, self.arch.llm_layers))
        if key not in self.sims:
            self.sims[key] = simulate(self.cfg, self.model_cfg, self.world, policies, self.samples, self.device)
        return self.sims[key]


@contextlib.contextmanager
def setup(cfg: config.Config, gpus: int, device: str = "cuda"):
    """A Setup for cfg on `gpus` fake ranks of `device` (its type: what model.denoiser.impl=auto resolves to); the
    fake process group lives as long as the context."""
    world = init_fake_world(gpus)
    try:
        with presets.arch_folders(cfg.model) as (model_cfg, sources):
            arch = flops.FakeModel(model_cfg, cfg.train.trainable, device=device).arch
            m = sample_mix(cfg, arch.visual_tokens)
            attn_tokens = packing_planner.attention_cost_tokens(
                arch.layer_linear * arch.llm_layers, arch.llm_layers, arch.hidden
            )
            yield Setup(cfg, model_cfg, world, device, arch, m, step_micro_batch(cfg, m, gpus, attn_tokens), sources)
    finally:
        dist.destroy_process_group()


def search(s: Setup, budget: float, memory=None) -> list[str] | None:
    """The per-layer policy of least recompute whose simulated peak fits `budget` GiB (None: not even all-full).
    choose_policy predicts from all-full, all-selective and all-none (each layer adds the same); the choice is then
    simulated, and while it does not fit, one more layer goes full. memory: Setup.memory, or a wrapper that prints."""
    memory = memory or s.memory
    layers = s.arch.llm_layers
    full, sel, none = (memory([x] * layers).peak / GIB for x in ("full", "selective", "none"))
    per_sel, per_none = (sel - full) / layers, (none - full) / layers
    print(f"  per decoder layer over full: selective +{per_sel:.2f} GiB, none +{per_none:.2f} GiB")
    choice = choose_policy(layers, full, per_sel, per_none, budget, lambda ps: s.step(ps).recompute)
    while choice is not None:
        chosen = ["full"] * choice[0] + ["selective"] * choice[1] + ["none"] * choice[2]
        if memory(chosen).peak / GIB <= budget or choice[0] == layers:
            return chosen
        choice = (choice[0] + 1, max(0, choice[1] - 1), choice[2] - (choice[1] == 0))  # one more full layer
    return None


def simulate_config(cfg: config.Config, gpus: int, device: str = "cuda") -> Memory:
    """Rank 0's simulated peak for cfg as it stands (its checkpointing policy, packing, text loss, denoiser, stored
    latents or the VAE) on `gpus` ranks of `device`: what the ladder reports on CPU."""
    with setup(cfg, gpus, device) as s:
        return s.memory(cfg.train.activation_checkpointing)


def plan_policy(cfg: config.Config, gpus: int, budget: float, device: str = "cuda") -> list[str] | None:
    """The planner's per-layer checkpointing policy for cfg on `gpus` ranks of `device` within `budget` GiB per rank
    (`search`)."""
    with setup(cfg, gpus, device) as s:
        return search(s, budget)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--gpus", type=int, required=True, help="ranks (FSDP2 shards over all of them)")
    p.add_argument("--gpu-gib", type=float, default=79.6, help="device memory, GiB (80 GB H100/A100: 79.6)")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    a = p.parse_intermixed_args(argv)
    t0 = time.perf_counter()
    cfg = config.load(a.config, a.overrides, check_paths=False)
    budget = budget_gib(a.gpu_gib)
    with setup(cfg, a.gpus) as s:
        lengths, images, _ = s.samples
        print(
            f"plan: {a.config} on {a.gpus} GPUs of {a.gpu_gib:g} GiB; architectures: "
            + ", ".join(f"{k} {v}" for k, v in s.sources.items())
        )
        print(
            f"mix: {s.mix.source}; simulated micro-batch (the step's largest): {sum(lengths)} tokens, "
            f"{len(lengths)} samples, {sum(images)} images"
        )
        configured = config.checkpoint_policies(cfg.train.activation_checkpointing, s.arch.llm_layers)
        f = s.step(configured)
        print(f"FLOPs per step by part, TFLOP (per GPU: / {a.gpus}); hardware with the config's policy:")
        for part in flops.PARTS:
            print(f"  {part:<11} model {f.model[part] / 1e12:10.1f}  hardware {f.hardware[part] / 1e12:10.1f}")
        print(f"  {'total':<11} model {f.model_total / 1e12:10.1f}  hardware {f.hardware_total / 1e12:10.1f}")

        def memory(policies):
            known = override(policies) in s.sims
            mem = s.memory(policies)
            if not known:
                print(
                    f"  {override(policies):<34} peak {mem.peak / GIB:6.1f} GiB: "
                    + ", ".join(f"{k} {v / GIB:.1f}" for k, v in mem.parts.items())
                    + f"; recompute {s.step(policies).recompute:.3f}"
                )
            return mem

        print("memory of one rank (simulated: FakeTensorMode, fake process group, FSDPMemTracker), GiB:")
        chosen = search(s, budget, memory)
        if chosen is None:
            print(f"no policy fits {budget:.1f} GiB: lower data.max_tokens or add GPUs")
        else:
            print(f"chosen (least recompute within the budget): train.activation_checkpointing={override(chosen)}")
        mem = memory(configured)
        r = f.recompute
        fits = "yes" if mem.peak / GIB <= budget else "no"
        print(
            f"budget: {a.gpu_gib:g} GiB less {MARGIN_FIXED_GIB:g} GiB (CUDA context, NCCL buffers) and "
            f"{MARGIN_SHARE:.0%} (fragmentation); {time.perf_counter() - t0:.0f} s"
        )
        print(f"plan: peak_gib {mem.peak / GIB:.1f} budget_gib {budget:.1f} fits {fits} recompute {r:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

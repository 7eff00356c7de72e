"""Typed configuration: one dataclass per component, YAML as serialisation, `key.sub=value` overrides.

Unknown keys, wrong types and impossible combinations are rejected before any work
starts, with the offending key named.

Each field is documented by the comment beside it (at the end of its line, or the comment lines just above it):
`describe()` reads those comments from this file, so `python -m fastross.train --help-config` lists every key with
the text a reader of this file sees. A field without a comment fails tests/test_config.py.
A YAML file may name another as its `base:` (see `read_yaml`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import os
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from fastross import towers


class ConfigError(ValueError):
    pass


# Choices used by more than one field or function, declared once; the others are Literal types at their field.
Part = Literal["projector", "llm", "denoiser"]  # what can train (train.trainable)
CheckpointPolicy = Literal["none", "full", "selective"]  # per decoder layer (train.activation_checkpointing)
Logger = Literal[
    "tensorboard", "wandb"
]  # train.loggers' backends; each is an optional extra: pip install 'fastross[NAME]'


@dataclass
class DenoiserConfig:
    kind: Literal["dit", "mlp"] = "dit"  # adaLN-Zero transformer over one image, or a per-token MLP
    depth: int = 3  # blocks; the reference pairs 3 -> width 1024, 8 -> 1280, 12 -> 1536
    width: int = 1024  # hidden width W
    heads: int = 16  # attention heads (dit only)
    replicas: int = 4  # (condition, target) replicas per image, each with its own t and noise
    # The ops: eager PyTorch (the reference's maths), fastross.kernels' fused Triton kernels, or auto: the kernels on
    # CUDA and PyTorch elsewhere (Triton has no CPU backend; its interpreter is for tests: fastross.model.denoiser).
    # The default stays torch until a lent GPU has run the kernels (README, "The 7B step: levers").
    impl: Literal["auto", "torch", "triton"] = "torch"
    dtype: Literal["fp32", "bf16"] = (
        "fp32"  # the denoiser's own FSDP2 precision, whatever train.dtype (fp32: the reference)
    )
    # The reference's way: the condition repeated per replica before its embedding (R times the embedding's work);
    # fastross embeds it once per image and broadcasts. The same numbers (benchmarks/throughput.py's first rung).
    repeat_cond: bool = False


@dataclass
class ModelConfig:
    vision_path: str = ""  # local folder of a SigLIP or CLIP vision model (+ its image processor); fastross.towers
    llm_path: str = ""  # local folder of a causal LM (+ its tokenizer), Qwen2 first
    vae_path: str = ""  # AutoencoderKL folder; needed only when the shards hold no latent moments
    select_layer: int = -2  # vision layer whose output feeds the projector (CLIP: its class token dropped)
    latent_channels: int = 16  # VAE latent channels, used when vae_path is empty (FLUX's)
    latent_shift: float = 0.1159  # VAE shift factor, used when vae_path is empty (FLUX's)
    latent_scale: float = 0.3611  # VAE scaling factor, used when vae_path is empty (FLUX's)
    recon_weight: float = 1.0  # lambda in L = L_text + lambda * L_recon
    # Whose model weights start this run: a run, checkpoint or export (fastross.export) folder, a checkpoint in the
    # reference ROSS layout, or a stage-1 mm_projector.bin (projector only; fastross.ross_format)
    init_from: str = ""
    fused_ce: bool = True  # text loss through Liger's fused linear cross-entropy: full-vocabulary logits never exist
    liger_kernels: bool = (
        False  # Liger's RMSNorm, SwiGLU MLP and RoPE in the LLM (GPU; RMSNorm and SwiGLU fail in the CPU interpreter)
    )
    # Where the text loss forms logits: at the supervised positions only, or, as the reference does, at every position
    # (padding included) with the unsupervised ones ignored. The same loss; "all" costs the logits of every token.
    ce_positions: Literal["supervised", "all"] = "supervised"
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)  # the denoiser that reconstructs the latents


@dataclass
class SourceConfig:
    shards: str = (
        ""  # a folder of MDS shards from `python -m fastross.data.convert`, or its URL (s3://, gs://, file://, ...)
    )
    weight: float = 1.0  # its share of every global batch, relative to the other sources' weights


@dataclass
class DataConfig:
    # Folder of MDS shards from `python -m fastross.data.convert`, or its URL (s3://, gs://, hf://, file://, ...)
    shards: str = ""
    # Several converted folders or URLs mixed by weight, per step, instead of data.shards: [{shards: ..., weight: W}]
    sources: list[SourceConfig] = field(default_factory=list)
    global_batch: int = 128  # samples per optimizer step, all ranks together
    max_tokens: int = 16384  # tokens per packed micro-batch, visual tokens counted
    # Order per epoch: global (a permutation), block (shards, then samples per window), none; auto: block for URLs
    shuffle: Literal["auto", "global", "block", "none"] = "auto"
    shuffle_window: int = 8  # shards whose samples a block shuffle mixes at once (and the cache holds at least)
    cache_dir: str = "~/.cache/fastross/shards"  # local copies of remote sources' shards, one folder per URL
    cache_limit: str | int = "50gb"  # the cache's size (50gb, 800mib, bytes) for all remotes; least recently used go
    seed: int = 0  # shuffle seed (and the mixture's draws)
    workers: int = 2  # loader worker processes per rank that prepare steps ahead (0: inline, in the trainer)
    prefetch: int = 2  # steps each loader worker prepares ahead (the DataLoader's prefetch_factor)
    image_backend: Literal["pil", "torchvision"] = (
        "pil"  # pil: bit-exact with the HF processor; torchvision: faster, JPEG only, within 2/255
    )
    # packed: samples balanced over ranks by cost and packed into varlen micro-batches of <= max_tokens tokens.
    # padded: the reference's way: each rank takes its contiguous share of the step's samples, in micro-batches of
    # `padded_samples`, every sample padded to the longest of its micro-batch (the same losses, more tokens computed).
    packing: Literal["packed", "padded"] = "packed"
    padded_samples: int = 4  # samples per padded micro-batch (the reference's per-device batch size)
    # A shard file whose hash differs from index.json's (checked when the loader opens the folder): "error" stops
    # the run naming the file; "skip" leaves its samples out of every epoch and reports their count at start.
    corrupt_shards: Literal["error", "skip"] = "error"
    # Held-out shards (`python -m fastross.data.convert`, the same tokenizer, template and vision tower) whose losses
    # are computed every train.eval_every steps, in global batches of global_batch samples ("": no held-out evaluation)
    eval_shards: str = ""


@dataclass
class AttentionConfig:
    backend: Literal["auto", "flash", "varlen", "flex", "sdpa"] = "auto"  # auto: flash > varlen on GPU, sdpa on CPU


@dataclass
class OptimConfig:
    lr_projector: float = 2e-5  # peak learning rate of the projector
    lr_denoiser: float = 2e-5  # peak learning rate of the denoiser
    lr_llm: float = 2e-5  # peak learning rate of the LLM
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    warmup_ratio: float = 0.03  # share of the steps with linear warm-up from 0
    grad_clip: float = 1.0  # max global gradient norm (0 disables)


@dataclass
class ProfileConfig:
    """torch.profiler's schedule over the step loop (fastross.metrics.profiler); off while active is 0."""

    wait: int = 1  # steps skipped before each cycle
    warmup: int = 1  # steps traced and dropped (the profiler's own start-up cost)
    active: int = 0  # steps recorded per cycle into one trace per rank under run_dir/profile (0: no profiler)
    repeat: int = 1  # cycles (0: cycles until the run ends)


@dataclass
class TrainConfig:
    trainable: list[Part] = field(default_factory=lambda: ["projector", "llm", "denoiser"])  # parts that train
    epochs: int = 1  # passes over the shards
    # the run's length in optimizer steps, inside or past train.epochs (then more epochs run); 0: the epochs' steps
    max_steps: int = 0
    # End this invocation after this step, checkpointed; the run's length and learning-rate schedule stay those of
    # epochs/max_steps, so starting it again resumes where it stopped (0: run to the end).
    stop_after: int = 0
    dtype: Literal["bf16", "fp32"] = "bf16"  # bf16: FSDP2 mixed precision with fp32 reduction
    seed: int = 0  # model init and noise keys
    log_every: int = 10  # optimizer steps between log lines
    eval_every: int = 0  # optimizer steps between held-out evaluations on data.eval_shards (0: none)
    ckpt_every: int = 500  # optimizer steps between checkpoints, one always at the end (0: none at all, for benchmarks)
    keep_checkpoints: int = 2  # newest checkpoints kept in run_dir/checkpoints
    async_checkpoint: bool = False  # stage to host memory, write in the background; the step waits only for the copy
    run_dir: str = "runs/default"  # metrics, config and checkpoints; a run resumes from it
    # A step whose loss or gradient norm is not finite is skipped (no update); after this many in a row the run stops,
    # naming the samples (their ids go to run_dir/nonfinite.jsonl either way).
    max_bad_steps: int = 3
    # Recompute in backward, per LLM decoder layer: "none", "full" (the whole layer) or "selective" (keep the
    # matmul and attention outputs, recompute the cheap ops). One policy for every layer, or a list with one
    # entry per layer, where "policy*N" stands for N layers in a row: [full*8, selective*8, none*12].
    activation_checkpointing: str | list[str] = "full"
    compile: bool = False  # torch.compile each LLM decoder layer and each denoiser block, before FSDP
    peak_tflops: float = (
        0.0  # the device's dense bf16 peak for MFU (0: fastross.flops' table by GPU name; CPU: measured)
    )
    fsdp_prefetch: int = 0  # decoder layers whose all-gather is issued ahead explicitly (0: FSDP's implicit one-ahead)
    # Backends beside metrics.jsonl, e.g. [tensorboard, wandb]; each is an optional extra: pip install 'fastross[NAME]'
    loggers: list[Logger] = field(default_factory=list)
    wandb_project: str = "fastross"  # the W&B project of runs with "wandb" in train.loggers
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # torch.profiler traces per rank (off by default)
    # Record the CUDA allocator's history from the start and dump it at the first log step to
    # run_dir/memory_snapshot_rank{R}.pickle (pytorch.org/memory_viz); CUDA only: a CPU run refuses it.
    memory_snapshot: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)  # the vision tower, LLM, VAE and denoiser
    data: DataConfig = field(default_factory=DataConfig)  # the converted shards and how steps are drawn from them
    attention: AttentionConfig = field(default_factory=AttentionConfig)  # the LLM's attention kernel
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and the learning-rate schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # the run: its length, precision, logs and checkpoints


def checkpoint_policies(spec: str | list, num_layers: int | None = None) -> list[str]:
    """train.activation_checkpointing -> one policy per decoder layer (or the expanded list, without a count).

    "full" -> [full] * num_layers; [full*2, none, selective] -> [full, full, none, selective].
    """
    key = "train.activation_checkpointing"
    entries = [spec] if isinstance(spec, str) else list(spec)
    out = []
    for e in entries:
        name, _, count = str(e).partition("*")
        if name not in typing.get_args(CheckpointPolicy) or (count and not (count.isdigit() and int(count) > 0)):
            raise ConfigError(
                f"{key}: bad entry {e!r}; use {', '.join(typing.get_args(CheckpointPolicy))}, optionally as 'policy*N' "
                "in a list"
            )
        out += [name] * (int(count) if count else 1)
    if num_layers is not None:
        if isinstance(spec, str) and "*" not in spec:
            return out * num_layers
        if len(out) != num_layers:
            raise ConfigError(f"{key}: {spec!r} names {len(out)} layers, but the LLM has {num_layers}")
    return out


# Keys that were booleans before they had choices: the choice each old value means.
LEGACY_BOOLS = {"data.shuffle": {True: "global", False: "none"}}


def _build(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"unknown key '{where}{key}'; known: {', '.join(sorted(names))}")
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key, val, typ = f"{where}{f.name}", raw[f.name], hints[f.name]
        if isinstance(val, bool) and key in LEGACY_BOOLS:
            val = LEGACY_BOOLS[key][val]
        if dataclasses.is_dataclass(typ):
            kw[f.name] = _build(typ, val, key + ".")
        else:
            kw[f.name] = _check(key, val, typ)
    return cls(**kw)


def choices(cls, name: str) -> tuple:
    """The allowed values of a Literal field, e.g. choices(AttentionConfig, "backend")."""
    return typing.get_args(typing.get_type_hints(cls)[name])


def _check(key: str, val, typ):
    if val is None and typ is str:  # `key=` on the command line, `key:` in YAML: empty (model.init_from= is none)
        return ""
    if typing.get_origin(typ) is Literal:
        allowed = typing.get_args(typ)
        if val not in allowed or isinstance(val, bool) != isinstance(allowed[0], bool):
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {val!r}")
        return val
    if typ is float and isinstance(val, int) and not isinstance(val, bool):
        return float(val)
    if typ is float and isinstance(val, str):  # PyYAML reads 1e-4 (no dot) as a string
        try:
            return float(val)
        except ValueError:
            pass
    origin = typing.get_origin(typ)
    members = typing.get_args(typ) if origin in (types.UnionType, typing.Union) else (typ,)  # str | list[str]
    base = tuple(typing.get_origin(a) or a for a in members)
    if base == (int,) and isinstance(val, bool) or not isinstance(val, base):
        name = typ.__name__ if isinstance(typ, type) else str(typ)
        raise ConfigError(f"{key}: expected {name}, got {val!r} ({type(val).__name__})")
    if isinstance(val, list):  # list[X]: every element an X (an int where a float is asked for, as above)
        (elem,) = next(typing.get_args(a) for a in members if typing.get_origin(a) is list)
        if dataclasses.is_dataclass(elem):  # list[SourceConfig]: every element a mapping of that section's keys
            return [_build(elem, v, f"{key}[{i}].") for i, v in enumerate(val)]
        return [_check(f"{key}[{i}]", v, elem) for i, v in enumerate(val)]
    return val


def _set(raw: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def read_yaml(path: str | Path, chain: tuple[Path, ...] = ()) -> dict:
    """A config file's keys over those of the file its `base:` names (relative to its own folder, recursively).

    Mappings merge key by key; any other value, a list included, replaces the base's. A base that comes back to a
    file of the chain is refused, naming the chain."""
    path = Path(path)
    if path.resolve() in chain:
        raise ConfigError(f"base: {' -> '.join(map(str, chain + (path.resolve(),)))} is a cycle")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + (f" (the base of {chain[-1]})" if chain else ""))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: base: expected a file name, got {base!r}")
    return _merge(read_yaml(path.parent / base, chain + (path.resolve(),)), raw)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# The keys that name local files or folders. A relative path is taken against the current directory when the config
# is loaded, so the run folder's config.yaml (and every checkpoint's) holds absolute paths.
PATH_KEYS = (
    "model.vision_path",
    "model.llm_path",
    "model.vae_path",
    "model.init_from",
    "data.shards",
    "data.eval_shards",
    "train.run_dir",
)


def absolute(path: str) -> str:
    """A path made absolute against the current directory; "" (none) and URLs (s3://...) stay as they are."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def load(path: str | None, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """check_paths=False: shapes-only tools (fastross.memory_plan) that need no folder to exist. No shard file is read
    here: what the shards say against data.* is fastross.data.sources.check_shard_facts, which the trainer runs next."""
    raw = read_yaml(path) if path else {}
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key.sub=value")
        k, v = o.split("=", 1)
        _set(raw, k.strip(), yaml.safe_load(v))
    cfg = _build(Config, raw, "")
    for key in PATH_KEYS:
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, absolute(getattr(getattr(cfg, section), name)))
    for source in cfg.data.sources:  # paths as well, as data.cache_dir (made when first used, so no PATH_KEY)
        source.shards = absolute(source.shards)
    cfg.data.cache_dir = absolute(cfg.data.cache_dir)
    validate(cfg, check_paths)
    return cfg


def check(path: str, overrides: list[str] = ()) -> tuple[Config, list[str]]:
    """`fastross.train CONFIG --check`: the config validated as `load` does, except that folders which do not exist
    come back as warnings, so that a recipe can be checked on a machine without its models and data. What the model
    folders hold is checked only when all of them exist (what the shards hold: the caller, as `load`'s)."""
    cfg = load(path, overrides, check_paths=False)
    missing = missing_folders(cfg)
    if not missing:
        validate(cfg)
    return cfg, missing


def missing_folders(cfg: Config) -> list[str]:
    """The path keys that point at nothing, each said as an error (`validate` raises the first)."""
    m, d = cfg.model, cfg.data
    out = []
    for key, path in (("model.vision_path", m.vision_path), ("model.llm_path", m.llm_path)):
        if not path:
            out.append(f"{key} is empty: point it at a local folder")
        elif not Path(path).is_dir():
            out.append(f"{key}: {path} is not a folder")
    for i, s in enumerate(data_sources(d)):  # a URL is not checked here: the loader fetches its index first
        key = f"data.sources[{i}].shards" if d.sources else "data.shards"
        if not s.shards:
            out.append(f"{key} is empty: point it at a local folder or a URL")
        elif "://" not in s.shards and not Path(s.shards).is_dir():
            out.append(f"{key}: {s.shards} is not a folder")
    for key, path in (("model.vae_path", m.vae_path), ("data.eval_shards", d.eval_shards)):
        if path and "://" not in path and not Path(path).is_dir():
            out.append(f"{key}: {path} is not a folder")
    if m.init_from and not Path(m.init_from).exists():
        out.append(f"model.init_from: {m.init_from} does not exist (empty: no initial weights)")
    return out


def validate(cfg: Config, check_paths: bool = True) -> None:
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    _validate_sources(d)
    if check_paths:
        missing = missing_folders(cfg)
        if missing:
            raise ConfigError(missing[0])
        _check_folders(cfg)
    if m.denoiser.kind == "dit" and (m.denoiser.width % m.denoiser.heads or m.denoiser.width % 4):
        raise ConfigError("model.denoiser.width must be divisible by model.denoiser.heads and by 4")
    if m.denoiser.replicas < 1 or m.denoiser.depth < 1:
        raise ConfigError("model.denoiser.replicas and model.denoiser.depth must be >= 1")
    if d.max_tokens < 1:
        raise ConfigError("data.max_tokens must be >= 1")
    if d.global_batch < 1:
        raise ConfigError("data.global_batch must be >= 1")
    if d.workers < 0 or d.prefetch < 1:
        raise ConfigError(f"data.workers must be >= 0 (got {d.workers}) and data.prefetch >= 1 (got {d.prefetch})")
    if not t.trainable:
        raise ConfigError(f"train.trainable is empty; choose from {', '.join(typing.get_args(Part))}")
    if len(o.betas) != 2:
        raise ConfigError("optim.betas must have two entries")
    if not 0 <= o.warmup_ratio < 1:
        raise ConfigError("optim.warmup_ratio must be in [0, 1)")
    checkpoint_policies(t.activation_checkpointing)
    if t.peak_tflops < 0:
        raise ConfigError(f"train.peak_tflops must be >= 0 (0: from the device table), got {t.peak_tflops}")
    if t.fsdp_prefetch < 0:
        raise ConfigError("train.fsdp_prefetch must be >= 0")
    pr = t.profile
    if min(pr.wait, pr.warmup, pr.active, pr.repeat) < 0:
        raise ConfigError("train.profile.wait, warmup, active and repeat must be >= 0")
    if t.max_bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    if t.max_steps < 0 or t.stop_after < 0:
        raise ConfigError(
            f"train.max_steps ({t.max_steps}) and train.stop_after ({t.stop_after}) must be >= 0 (0: no limit)"
        )
    if t.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {t.epochs}")
    if t.eval_every < 0 or (t.eval_every > 0) != bool(d.eval_shards):
        raise ConfigError(
            "data.eval_shards and train.eval_every go together: a converted held-out folder and the "
            f"steps between evaluations (> 0), or neither (got {d.eval_shards!r} and {t.eval_every})"
        )
    if t.log_every < 1 or t.ckpt_every < 0 or t.keep_checkpoints < 1:
        raise ConfigError("train.log_every and train.keep_checkpoints must be >= 1, train.ckpt_every >= 0")
    if t.ckpt_every == 0 and t.stop_after:
        raise ConfigError("train.stop_after needs checkpoints to resume from: train.ckpt_every must not be 0")


def data_sources(d: DataConfig) -> list[SourceConfig]:
    """data.sources, or data.shards as the one source."""
    return d.sources or [SourceConfig(d.shards, 1.0)]


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """'50gb' -> 50 * 10**9 bytes (kb/mb/gb/tb decimal, kib/mib/gib/tib binary, a bare number in bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in _UNITS:
        units = ", ".join(k for k in _UNITS if k)
        raise ValueError(f"{text!r} is not a size: use a number with an optional unit ({units})")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _validate_sources(d: DataConfig) -> None:
    """What data.sources and the remote keys must be whatever the folders hold (missing_folders checks those)."""
    if d.shards and d.sources:
        raise ConfigError(
            "data.shards and data.sources are both set: use data.shards for one folder, or list it among data.sources"
        )
    for i, s in enumerate(d.sources):
        if not s.weight > 0:
            raise ConfigError(f"data.sources[{i}].weight must be > 0, got {s.weight}")
    if d.shuffle_window < 1:
        raise ConfigError(f"data.shuffle_window must be >= 1, got {d.shuffle_window}")
    try:
        parse_size(d.cache_limit)
    except ValueError as e:
        raise ConfigError(f"data.cache_limit: {e}") from None


def _folder_config(key: str, path: str) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"{key}: {file} is missing: {path} is not a Hugging Face model folder")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}: {file} is not valid JSON ({e.msg}, line {e.lineno})") from None


def _check_folders(cfg: Config) -> None:
    """What the model folders say against the config: model types, select_layer. What the shards say (the data
    set's size, its image tokens) is the data side's to read: fastross.data.sources.check_shard_facts, which the
    trainer runs after `load`."""
    # transformers (torch under it) only when folders are checked: `import fastross.config` stays light (data side)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    m = cfg.model
    _folder_config("model.vision_path", m.vision_path)
    try:
        tower = towers.read_tower(m.vision_path)
    except towers.TowerError as e:
        raise ConfigError(f"model.vision_path: {e}") from None
    try:
        tower.kept_layers(m.select_layer)
    except towers.TowerError as e:
        raise ConfigError(str(e)) from None
    llm = _folder_config("model.llm_path", m.llm_path)
    if str(llm.get("model_type")).startswith("ross_"):  # the reference's whole checkpoint (fastross.ross_format)
        raise ConfigError(
            f"model.llm_path: {m.llm_path} is a reference ROSS checkpoint ({llm['model_type']}), not an LLM folder: "
            f"import it once with `python -m fastross.convert_checkpoint {m.llm_path} --out RUN`, then start from it "
            "with model.init_from=RUN and model.llm_path=the base LLM's folder it names"
        )
    if llm.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"model.llm_path: {m.llm_path} holds a {llm.get('model_type')!r} model, not a causal LM")
    if m.vae_path:
        vae = _folder_config("model.vae_path", m.vae_path)
        if vae.get("_class_name") != "AutoencoderKL":
            raise ConfigError(f"model.vae_path: {m.vae_path} holds a {vae.get('_class_name')!r}, not an AutoencoderKL")


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """Each field of a config dataclass -> its documentation, as one line: the comment lines just above the field
    (no blank line between) followed by the comment at the end of its line(s), read from this file's source."""
    src = textwrap.dedent(inspect.getsource(cls))
    lines = src.splitlines()
    comments, alone = {}, set()  # line number -> comment text; the lines that hold nothing but a comment
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            comments[row] = tok.string.lstrip("#").strip()
            if not lines[row - 1][:col].strip():
                alone.add(row)
    docs = {}
    for node in ast.parse(src).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, row = [], node.lineno - 1
            while row in alone:
                above.insert(0, comments[row])
                row -= 1
            after = [comments[r] for r in range(node.lineno, node.end_lineno + 1) if r in comments and r not in alone]
            docs[node.target.id] = " ".join(above + after)
    return docs


def type_name(typ) -> str:
    """A field's type as --help-config prints it: Literal choices joined by |, e.g. list[projector|llm|denoiser]."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(map(type_name, args))
    if origin is list:
        return f"list[{type_name(args[0])}]"
    return "None" if typ is type(None) else typ.__name__


def keys(cls=None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default as JSON, documentation) of every field, sections (nested dataclasses) included; the
    fields of a list of sections follow it as `key[].field`."""
    cls = cls or Config
    hints, docs, out = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        key, typ = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(typ):
            out.append((key, "section", "", docs.get(f.name, "")))
            out += keys(typ, key + ".")
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        out.append((key, type_name(typ), json.dumps(default, default=str), docs.get(f.name, "")))
        elem = typing.get_args(typ)[0] if typing.get_origin(typ) is list else None
        if dataclasses.is_dataclass(elem):
            out += keys(elem, key + "[].")
    return out


def describe() -> str:
    """`fastross.train --help-config`: one line per key, the dotted name first, then type, default and documentation."""
    rows = [
        (
            "base",
            "str",
            '""',
            "a config file, relative to this one's folder, whose keys this file overrides "
            "(recursively: the base may have a base)",
        )
    ] + keys()
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{k:<{width[0]}}  {t:<{width[1]}}  {d:<{width[2]}}  {doc}" for k, t, d, doc in rows)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

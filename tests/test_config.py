"""Config loading: overrides, and errors that name the offending key before any work starts."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastross import config


@pytest.fixture
def base(tmp_path, tiny_models, stage2_shards):
    p = tmp_path / "c.yaml"
    p.write_text(
        f"model: {{vision_path: {tiny_models / 'vision'}, llm_path: {tiny_models / 'llm'}}}\n"
        f"data: {{shards: {stage2_shards}, global_batch: 8}}\n"
    )
    return p


def test_defaults_and_overrides(base):
    cfg = config.load(str(base), ["train.max_steps=7", "model.denoiser.kind=mlp", "optim.lr_llm=1e-4"])
    assert cfg.train.max_steps == 7 and cfg.model.denoiser.kind == "mlp" and cfg.optim.lr_llm == 1e-4
    assert cfg.model.select_layer == -2 and cfg.model.denoiser.replicas == 4 and cfg.model.recon_weight == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.denoiser.widht=3", "unknown key 'model.denoiser.widht'"),
        ("train.max_steps=many", "train.max_steps: expected int"),
        ("train.dtype=fp8", "train.dtype must be one of 'bf16', 'fp32', got 'fp8'"),
        ("train.trainable=[vision]", "train.trainable"),
        ("model.denoiser.heads=5", "model.denoiser.width must be divisible"),
        ("model.denoiser.impl=cuda", "model.denoiser.impl must be one of 'auto', 'torch', 'triton', got 'cuda'"),
        ("attention.backend=xformers", "attention.backend must be one of 'auto', 'flash'"),
        ("data.shards=/nonexistent", "data.shards: /nonexistent is not a folder"),
        ("train.activation_checkpointing=3", "train.activation_checkpointing: expected str | list"),
        ("train.activation_checkpointing=partial", "train.activation_checkpointing: bad entry 'partial'"),
        ("train.activation_checkpointing=[full*0]", "train.activation_checkpointing: bad entry 'full*0'"),
        ("train.ckpt_every=-1", "train.ckpt_every >= 0"),
        ("nokey", "is not of the form key.sub=value"),
        # issue 11 item 6: each rejected before any work, the key named
        ("train.max_steps=-1", "train.max_steps (-1) and train.stop_after (0) must be >= 0"),
        ("train.epochs=0", "train.epochs must be >= 1, got 0"),
        ("model.select_layer=-4", "model.select_layer=-4 is out of range for the vision tower's 3 layers"),
        ("model.select_layer=0", "model.select_layer=0 is out of range"),
        ("optim.betas=[0.9, fast]", "optim.betas[1]: expected float, got 'fast' (str)"),
        ("train.trainable=[llm, 3]", "train.trainable[1] must be one of 'projector', 'llm', 'denoiser', got 3"),
        ("train.loggers=[mlflow]", "train.loggers[0] must be one of 'tensorboard', 'wandb', got 'mlflow'"),
        ("train.trainable=[]", "train.trainable is empty; choose from projector, llm, denoiser"),
        ("model.init_from=/nonexistent", "model.init_from: /nonexistent does not exist"),
        ("train.activation_checkpointing=[full, 2]", "train.activation_checkpointing[1]: expected str"),
    ],
)
def test_bad_config_names_the_key(base, override, message):
    with pytest.raises(config.ConfigError, match=None) as e:
        config.load(str(base), [override])
    assert message in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.global_batch=77", "data.global_batch=77 is larger than"),
        ("data.max_tokens=64", "data.max_tokens=64 holds no image sample: one image is 64 visual tokens"),
    ],
)
def test_shard_facts_against_data_keys_before_work(base, override, message, capsys):
    """What the shards say is read on the data side (config.load reads no shard file), before any work: by the
    trainer's entry point and by --check, both with the message that names the key."""
    from fastross import train
    from fastross.data.sources import check_shard_facts

    cfg = config.load(str(base), [override])  # valid as a config: the shards are not its to read
    with pytest.raises(config.ConfigError) as e:
        check_shard_facts(cfg.data)
    assert message in str(e.value)
    for argv in ([str(base), override], [str(base), override, "--check"]):
        assert train.main(argv) == 2
        assert f"train: config error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key, folder, message",
    [
        (
            "model.vision_path",
            "llm",
            "holds a 'qwen2' model, not a supported vision tower (model_type one of "
            "siglip_vision_model, siglip, clip_vision_model, clip)",
        ),
        ("model.llm_path", "vision", "holds a 'siglip_vision_model' model, not a causal LM"),
        ("model.vae_path", "llm", "holds a None, not an AutoencoderKL"),
        ("model.llm_path", "missing", "config.json is missing"),
    ],
)
def test_model_folder_of_the_wrong_type(base, tiny_models, tmp_path, key, folder, message):
    (tmp_path / "missing").mkdir()
    path = tmp_path / "missing" if folder == "missing" else tiny_models / folder
    with pytest.raises(config.ConfigError) as e:
        config.load(str(base), [f"{key}={path}"])
    assert str(e.value).startswith(key) and message in str(e.value)


def test_no_checkpoints_only_without_stop_after(base):
    assert config.load(str(base), ["train.ckpt_every=0"]).train.ckpt_every == 0  # benchmarks: no 7B-sized saves
    with pytest.raises(config.ConfigError, match="train.stop_after needs checkpoints"):
        config.load(str(base), ["train.ckpt_every=0", "train.stop_after=2"])


def test_yaml_round_trip(base, tmp_path):
    cfg = config.load(str(base), ["train.log_every=3"])
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(config.dump(cfg))
    assert config.load(str(dumped)) == cfg


def test_train_cli_rejects_bad_key_before_work(base):
    p = subprocess.run(
        [sys.executable, "-m", "fastross.train", str(base), "optim.lr=1"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2
    assert "unknown key 'optim.lr'" in p.stderr


def test_checkpoint_policies_expand():
    assert config.checkpoint_policies("selective", 3) == ["selective"] * 3
    assert config.checkpoint_policies(["full*2", "none", "selective*1"], 4) == ["full", "full", "none", "selective"]
    with pytest.raises(config.ConfigError, match="names 3 layers, but the LLM has 4"):
        config.checkpoint_policies(["full*2", "none"], 4)


@pytest.mark.parametrize("recipe", ["tiny_pretrain", "tiny", "7b_pretrain", "7b"])
def test_shipped_configs_load(recipe, tiny_models, stage2_shards):
    """Every recipe in configs/ passes the type checks (its folders pointed at the test's own, its global batch at
    most the test data's 76 samples)."""
    cfg = config.load(
        f"configs/{recipe}.yaml",
        [
            f"model.vision_path={tiny_models / 'vision'}",
            f"model.llm_path={tiny_models / 'llm'}",
            f"data.shards={stage2_shards}",
            "data.global_batch=8",
            "model.init_from=",
        ],
    )
    if recipe.startswith("7b"):  # per-layer policies for the recipe's own LLM (fastross.memory_plan chose 7b.yaml's)
        from fastross.model.presets import QWEN2_7B

        policies = config.checkpoint_policies(cfg.train.activation_checkpointing, QWEN2_7B["num_hidden_layers"])
        assert policies == (["full"] * 28 if recipe == "7b_pretrain" else ["full"] * 8 + ["selective"] * 20)
    else:
        assert config.checkpoint_policies(cfg.train.activation_checkpointing, 2) == ["full", "full"]


# issue 12 item 6: a config a user can read ------------------------------------------------------------------------


def dotted_fields(cls, prefix=""):
    """Every field of the config dataclasses by dotted name, sections (and lists of them: `key[].field`) included,
    walked independently of config.keys."""
    import typing

    for f in dataclasses.fields(cls):
        yield prefix + f.name
        typ = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            yield from dotted_fields(typ, f"{prefix}{f.name}.")
        elif typing.get_origin(typ) is list and dataclasses.is_dataclass(typing.get_args(typ)[0]):
            yield from dotted_fields(typing.get_args(typ)[0], f"{prefix}{f.name}[].")


def test_help_config_lists_every_key_with_type_default_and_doc(capsys):
    from fastross.train import main

    with pytest.raises(SystemExit) as e:
        main(["--help-config"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["base", *dotted_fields(config.Config)]  # one line per key
    by_key = {cols[0]: cols[1:] for cols in (re.split(r" {2,}", line) for line in lines)}  # columns: 2+ spaces apart
    assert by_key["model.denoiser.kind"] == [
        "dit|mlp",
        '"dit"',
        "adaLN-Zero transformer over one image, or a per-token MLP",
    ]
    assert by_key["train.trainable"][:2] == ["list[projector|llm|denoiser]", '["projector", "llm", "denoiser"]']
    assert by_key["optim.betas"][:2] == ["list[float]", "[0.9, 0.999]"]
    assert by_key["train.activation_checkpointing"][:2] == ["str | list[str]", '"full"']
    assert by_key["train.profile"] == ["section", "torch.profiler traces per rank (off by default)"]  # no default
    # a comment block above a field and the one after it, joined into one line
    assert by_key["data.packing"][2] == (
        "packed: samples balanced over ranks by cost and packed into varlen micro-batches of <= max_tokens tokens. "
        "padded: the reference's way: each rank takes its contiguous share of the step's samples, in micro-batches of "
        "`padded_samples`, every sample padded to the longest of its micro-batch (the same losses, more tokens "
        "computed)."
    )
    sections = {k for k, v in by_key.items() if v[0] == "section"}
    assert sections == {"model", "model.denoiser", "data", "attention", "optim", "train", "train.profile"}
    undocumented = [k for k, v in by_key.items() if len(v) != (2 if k in sections else 3)]
    assert not undocumented, undocumented


def test_every_comment_in_the_config_classes_is_some_keys_doc():
    """No comment text is lost: each comment inside a config dataclass belongs to a field (a blank line between a
    comment and its field, or a comment about nothing, would drop it from --help-config)."""
    import inspect
    import io
    import tokenize

    docs = " ".join(doc for _, _, _, doc in config.keys())
    classes = [c for c in vars(config).values() if dataclasses.is_dataclass(c) and c.__name__.endswith("Config")]
    assert len(classes) >= 8  # Config and its sections
    for cls in classes:
        src = inspect.getsource(cls)
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                assert tok.string.lstrip("#").strip() in docs, (cls.__name__, tok.string)


def test_train_help_names_help_config(capsys):
    from fastross.train import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--help-config" in capsys.readouterr().out


def test_base_is_merged_recursively_and_cycles_are_refused(tmp_path):
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "a.yaml").write_text(
        "model: {denoiser: {depth: 8, width: 1280, heads: 16}, recon_weight: 0.5}\n"
        "data: {global_batch: 64}\ntrain: {trainable: [projector, llm], log_every: 7}\n"
    )
    (tmp_path / "bases" / "b.yaml").write_text(
        "base: a.yaml\nmodel: {denoiser: {depth: 12}}\ndata: {global_batch: 32}\n"
    )
    (tmp_path / "c.yaml").write_text("base: bases/b.yaml\ntrain: {trainable: [denoiser]}\n")  # relative to its folder
    cfg = config.load(str(tmp_path / "c.yaml"), ["data.max_tokens=999"], check_paths=False)
    assert (cfg.model.denoiser.depth, cfg.model.denoiser.width, cfg.model.recon_weight) == (12, 1280, 0.5)
    assert (cfg.data.global_batch, cfg.data.max_tokens) == (32, 999)
    assert cfg.train.trainable == ["denoiser"] and cfg.train.log_every == 7  # a list replaces, a mapping merges
    assert cfg.model.denoiser.replicas == 4  # defaults under everything

    (tmp_path / "bases" / "a.yaml").write_text("base: ../c.yaml\n")
    with pytest.raises(config.ConfigError, match=r"base: .*c\.yaml -> .*b\.yaml -> .*a\.yaml -> .*c\.yaml is a cycle"):
        config.load(str(tmp_path / "c.yaml"), check_paths=False)
    (tmp_path / "bases" / "a.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(config.ConfigError, match=r"gone\.yaml does not exist \(the base of .*a\.yaml\)"):
        config.load(str(tmp_path / "c.yaml"), check_paths=False)


def test_7b_stage2_is_stage1_with_its_overrides():
    s1 = config.load(ROOT / "configs/7b_pretrain.yaml", check_paths=False)
    s2 = config.load(ROOT / "configs/7b.yaml", check_paths=False)
    assert (s2.model.vision_path, s2.model.denoiser, s2.data.max_tokens) == (
        s1.model.vision_path,
        s1.model.denoiser,
        s1.data.max_tokens,
    )
    assert (s2.data.global_batch, s2.optim.lr_llm, s2.train.trainable) == (128, 2e-5, ["projector", "llm", "denoiser"])
    assert (s1.data.global_batch, s1.optim.lr_denoiser, s1.train.trainable) == (256, 1e-4, ["projector", "denoiser"])
    assert "vision_path" not in (ROOT / "configs/7b.yaml").read_text()  # no longer repeated


def test_init_from_empty_means_none(base, tmp_path):
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    derived = tmp_path / "derived.yaml"
    derived.write_text(f"base: {base.name}\nmodel: {{init_from: {stage1}}}\n")
    assert config.load(str(derived)).model.init_from == str(stage1)
    assert config.load(str(derived), ["model.init_from="]).model.init_from == ""
    derived.write_text(f"base: {base.name}\nmodel: {{init_from: }}\n")  # YAML's empty value too
    assert config.load(str(derived)).model.init_from == ""
    with pytest.raises(config.ConfigError, match="train.max_steps: expected int, got None"):  # only str keys
        config.load(str(base), ["train.max_steps="])


ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def test_recipes_include_the_papers_main_ones():
    names = {p.stem for p in RECIPES}
    assert {
        "7b_pretrain",
        "7b",
        "clip_vicuna_7b_pretrain",
        "clip_vicuna_7b",
        "qwen25_7b_pretrain",
        "qwen25_7b",
    } <= names
    clip1, clip2 = (config.load(ROOT / f"configs/clip_vicuna_7b{s}.yaml", check_paths=False) for s in ("_pretrain", ""))
    # scripts/train_ross/{pretrain,finetune}_clip_vicuna.sh of the reference: 256 at 1e-3 (denoiser too), 128 at 2e-5
    assert (clip1.data.global_batch, clip1.optim.lr_projector, clip1.optim.lr_denoiser) == (256, 1e-3, 1e-3)
    assert (clip2.data.global_batch, clip2.optim.lr_llm, clip2.model.recon_weight) == (128, 2e-5, 1.0)
    assert "clip-vit-large-patch14-336" in clip2.model.vision_path and "vicuna-7b" in clip2.model.llm_path


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_check_passes_every_recipe_missing_folders_warned(recipe, capsys):
    """`fastross.train CONFIG --check` on this machine (no 7B folders): exit 0, each missing folder a warning naming
    its key and path, the resolved config on stdout."""
    import yaml

    from fastross.train import main

    assert main([str(recipe), "--check"]) == 0
    out, err = capsys.readouterr()
    cfg = config.load(str(recipe), check_paths=False)
    assert config._build(config.Config, yaml.safe_load(out), "") == cfg  # the resolved config, bases merged
    warned = [line.removeprefix("train: warning: ") for line in err.splitlines() if line.startswith("train: warning:")]
    assert warned == config.missing_folders(cfg)
    for key in set(config.PATH_KEYS) - {"train.run_dir"}:  # each warned path is missing, each other one present
        section, name = key.split(".")
        path = getattr(getattr(cfg, section), name)
        assert any(w.startswith(key) for w in warned) == (bool(path) and not Path(path).exists()), key


def test_check_with_folders_present_checks_them(base, tiny_models, capsys):
    from fastross.train import main

    assert main([str(base), "--check"]) == 0
    assert "0 missing folder(s)" in capsys.readouterr().err
    assert main([str(base), "--check", f"model.vision_path={tiny_models / 'llm'}"]) == 2
    assert "not a supported vision tower (model_type one of" in capsys.readouterr().err
    assert main([str(base), "--check", "optim.lr=1"]) == 2
    assert "unknown key 'optim.lr'" in capsys.readouterr().err


@pytest.fixture
def world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_relative_paths_stored_absolute_versions_and_decay_groups(
    tiny_models, stage2_shards, tmp_path, monkeypatch, world_of_one
):
    """Relative paths are taken against the current directory and the run folder's config.yaml holds them absolute;
    versions.json holds the commit and the library versions; with weight decay on, the 1-D parameters of every
    trainable part (biases, norms) are in groups without it."""
    import importlib.metadata
    import json

    import torch
    import yaml

    from fastross.distributed import World
    from fastross.train import Trainer, param_groups

    (tmp_path / "models").symlink_to(tiny_models)
    (tmp_path / "shards").symlink_to(stage2_shards)
    monkeypatch.chdir(tmp_path)
    cfg = config.load(
        None,
        [
            "model.vision_path=models/vision",
            "model.llm_path=./models/llm",
            "data.shards=shards",
            "train.run_dir=run",
            "data.global_batch=4",
            "data.workers=0",
            "train.dtype=fp32",
            "model.fused_ce=false",
            "optim.weight_decay=0.1",
        ],
    )
    trainer = Trainer(cfg, World(0, 1, 0, torch.device("cpu")))
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["model"]["vision_path"] == str(tmp_path / "models" / "vision")  # absolute, symlinks kept
    assert stored["model"]["llm_path"] == str(tmp_path / "models" / "llm")
    assert (stored["data"]["shards"], stored["train"]["run_dir"]) == (str(tmp_path / "shards"), str(tmp_path / "run"))
    assert stored["model"]["init_from"] == ""

    rec = json.loads((tmp_path / "run" / "versions.json").read_text())
    assert rec["packages"] == {
        name: importlib.metadata.version(name)
        for name in ("torch", "transformers", "triton", "liger-kernel", "mosaicml-streaming")
    }
    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if (repo / ".git").exists() and head.returncode == 0:  # tests run from the checkout fastross is installed from
        assert rec["git"]["commit"] == head.stdout.strip() and len(rec["git"]["commit"]) == 40
    else:
        assert rec["git"] is None
    monkeypatch.chdir(tmp_path.parent)  # the stored config no longer depends on the current directory
    assert config.load(str(tmp_path / "run" / "config.yaml")) == cfg

    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"projector", "projector.no_decay", "llm", "llm.no_decay", "denoiser", "denoiser.no_decay"}
    for part in ("projector", "llm", "denoiser"):
        named = {id(p): n for n, p in getattr(trainer.model, part).named_parameters() if p.requires_grad}
        decayed, flat = groups[part], groups[f"{part}.no_decay"]
        assert (decayed["weight_decay"], flat["weight_decay"]) == (0.1, 0.0)
        assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in flat["params"])
        assert len(decayed["params"]) + len(flat["params"]) == len(named)  # every trainable parameter, once
        flat_names = [named[id(p)] for p in flat["params"]]
        assert flat_names and all(n.endswith("bias") or "norm" in n.split(".")[-2] for n in flat_names), flat_names
    off = param_groups(trainer.model, ["projector", "llm", "denoiser"], dict.fromkeys(groups, 1.0), 0.0)
    assert [g["name"] for g in off] == ["projector", "llm", "denoiser"]  # weight decay off: one group per part


def reference_cosine(warmup: int, total: int):
    """fastross's schedule before it used transformers': linear warm-up from 0, then cosine decay to 0."""
    import math

    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return f


@pytest.mark.parametrize("warmup, total", [(0, 1), (1, 1), (1, 7), (3, 100), (0, 50), (66, 2181), (156, 5199)])
def test_cosine_schedule_equals_ours_to_the_bit(warmup, total):
    """transformers' get_cosine_schedule_with_warmup gives the very learning rates of fastross's former formula over
    whole schedules, each step and the one after the last: 66 of 2181 steps is LLaVA-558K at batch 256 with 3%
    warm-up, 156 of 5199 the 665K mix at 128."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
        sched = make(opt)
        out = []
        for _ in range(total + 1):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, reference_cosine(warmup, total)))
    theirs = lrs(lambda opt: get_cosine_schedule_with_warmup(opt, warmup, total))
    assert theirs == ours
    assert ours[warmup] == 2e-5 and (ours[-1] == 0.0 or warmup == total)


def test_slurm_script_runs_torchrun_with_c10d_for_two_nodes(tmp_path):
    """scripts/slurm.sbatch under a stand-in SLURM (srun and scontrol that record what they are asked): one torchrun
    per node with the c10d rendezvous on the first node, arguments torchrun's own parser accepts."""
    from torch.distributed.run import get_args_parser

    bin_dir, argv_file = tmp_path / "bin", tmp_path / "srun_argv"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv_file}\n')
    (bin_dir / "scontrol").write_text(
        '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu-[07-08]" ] && printf "gpu-07\\ngpu-08\\n"\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SLURM_JOB_NODELIST": "gpu-[07-08]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "8",
    }
    p = subprocess.run(
        ["bash", "scripts/slurm.sbatch", "configs/7b.yaml", "train.max_steps=5"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    argv = argv_file.read_text().splitlines()
    assert argv[:2] == ["--kill-on-bad-exit=1", "torchrun"]
    a = get_args_parser().parse_args(argv[2:])
    assert (a.nnodes, a.nproc_per_node, a.rdzv_backend, a.rdzv_endpoint, a.rdzv_id) == (
        "2",
        "8",
        "c10d",
        "gpu-07:29500",
        "fastross-4242",
    )
    assert a.module and a.training_script == "fastross.train"
    assert a.training_script_args == ["configs/7b.yaml", "train.max_steps=5"]
    assert "#SBATCH --nodes=2" in (ROOT / "scripts/slurm.sbatch").read_text()


@dataclasses.dataclass
class _Source:
    path: str = ""  # where it is
    # how much of it
    weight: float = 1.0


@dataclasses.dataclass
class _Mixed:
    # the parts,
    # each a _Source
    sources: list[_Source] = dataclasses.field(default_factory=list)  # (empty: none)
    window: int | None = None  # optional


def test_keys_of_a_list_of_sections_and_comment_placement():
    """config.keys on any config-style dataclass: a comment block above and one after join; a list of sections lists
    its element's keys as `key[].field` (data.sources' shape)."""
    assert config.keys(_Mixed) == [
        ("sources", "list[_Source]", "[]", "the parts, each a _Source (empty: none)"),
        ("sources[].path", "str", '""', "where it is"),
        ("sources[].weight", "float", "1.0", "how much of it"),
        ("window", "int | None", "null", "optional"),
    ]


def test_no_arguments_print_the_usage_and_the_recipes(capsys):
    from fastross.train import main

    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and "python -m fastross.train CONFIG" in err
    assert all(p.name in err for p in RECIPES) and "configs" in err


def test_max_steps_sets_the_length_past_the_epochs():
    """train.max_steps is the run's length whether it ends inside train.epochs or past them (more epochs run); the
    start line says both when they differ (tests/test_default_save.py runs 3 steps of a 2-step epoch)."""
    from fastross.train import run_steps, steps_note

    assert [run_steps(1, m, 18) for m in (0, 10, 18, 40)] == [18, 10, 18, 40]
    assert run_steps(2, 0, 18) == 36
    assert steps_note(2, 40, 18) == (
        "40 steps (18/epoch): train.max_steps=40 sets the length, 2.22 epochs (train.epochs=2 alone gives 36 steps)"
    )
    assert steps_note(2, 0, 18) == steps_note(2, 36, 18) == "36 steps (18/epoch)"

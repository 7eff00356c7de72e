"""Every entry point on vision folders written by transformers' own default `save_pretrained` (issue 20, item 1).

transformers 4.57 saves a SiglipVisionConfig without `vision_use_head` unless it was set, and so do the reference's
and the hub's SigLIP folders. fastross used to pass the key to from_pretrained, which goes on to the model's
__init__ when the folder lacks it: generate and eval crashed with "unexpected keyword argument 'vision_use_head'".
Here a tiny SigLIP and a tiny CLIP folder, each saved with nothing but defaults, go through convert, --check, train,
plan, export, generate and eval; the exported Llava gives fastross's logits and greedy answers.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devtools.faults import metrics, write_config

pytestmark = pytest.mark.slow  # a training process per tower

KINDS = ("siglip", "clip")
RECORDS = 8  # of the bundled stage-2 set: two global batches of 4 an epoch, quick to convert


def make_default_tower(out: Path, kind: str, seed: int = 0) -> Path:
    """A tiny vision folder (64 px, 8 px patches, 3 layers) saved by save_pretrained with defaults only: no key that
    make_tiny sets by hand (SigLIP's vision_use_head above all), its image processor beside it."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(seed)
    shape = dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=64, patch_size=8
    )
    if kind == "siglip":
        SiglipVisionModel(SiglipVisionConfig(**shape)).save_pretrained(out)
        SiglipImageProcessor(size={"height": 64, "width": 64}).save_pretrained(out)
    else:
        CLIPVisionModel(CLIPVisionConfig(**shape)).save_pretrained(out)
        CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def tower(kind, tmp_path_factory) -> Path:
    out = make_default_tower(tmp_path_factory.mktemp(f"default_{kind}") / kind, kind)
    saved = json.loads((out / "config.json").read_text())
    assert "vision_use_head" not in saved  # the folder as transformers writes it (the bug's precondition)
    return out


@pytest.fixture(scope="module")
def shards(tower, tiny_models, synth_data, tmp_path_factory) -> Path:
    from fastross.data.convert import main

    tmp = tmp_path_factory.mktemp(f"default_{tower.name}_shards")
    records = json.loads((synth_data / "stage2.json").read_text())[:RECORDS]
    (tmp / "stage2.json").write_text(json.dumps(records))
    out = tmp / "stage2"
    assert (
        main(
            [
                "--json",
                str(tmp / "stage2.json"),
                "--images",
                str(synth_data / "images"),
                "--tokenizer",
                str(tiny_models / "llm"),
                "--vision",
                str(tower),
                "--vae",
                str(tiny_models / "vae"),
                "--template",
                "qwen2_ross",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((out / "fastross.json").read_text())["grid"] == 8
    return out


@pytest.fixture(scope="module")
def recipe(tower, shards, tiny_models, tmp_path_factory) -> tuple[Path, list[str]]:
    tmp = tmp_path_factory.mktemp(f"default_{tower.name}_run")
    # 3 steps of a 2-step epoch: train.max_steps sets the length (issue 20, item 4)
    cfg = write_config(tmp / "c.yaml", tiny_models, shards, tmp / "run", workers=0, max_steps=3, ckpt_every=10)
    return cfg, [f"model.vision_path={tower}", "data.global_batch=4"]


@pytest.fixture(scope="module")
def run_dir(recipe) -> Path:
    """Three steps on one rank, `python -m fastross.train` as a user starts it (no torchrun)."""
    cfg, overrides = recipe
    p = subprocess.run(
        [sys.executable, "-m", "fastross.train", str(cfg), *overrides], capture_output=True, text=True, timeout=600
    )
    out = p.stdout + p.stderr
    assert "train: done" in out, out[-4000:]
    assert "returned a view tensor" not in out  # item 6: FSDP2's warning about the denoiser's output, gone at its cause
    assert (
        "3 steps (2/epoch): train.max_steps=3 sets the length, 1.50 epochs (train.epochs=1 alone gives 2 steps)" in out
    )
    return cfg.parent / "run"


def test_default_save_check_and_train(kind, recipe, run_dir, capsys):
    """--check passes (what the trainer checks before training, short of the weights); the run trained its steps,
    into a second epoch."""
    from fastross.train import main

    cfg, overrides = recipe
    assert main([str(cfg), "--check", *overrides]) == 0
    assert "config valid, 0 missing folder(s)" in capsys.readouterr().err
    got = metrics(run_dir)
    assert [m["step"] for m in got] == [1, 2, 3]
    assert all(m["images"] > 0 and 0 < m["text_loss"] < 20 and 0 < m["recon_loss"] < 10 for m in got)


def test_default_save_plan(recipe, capsys):
    from fastross import memory_plan

    cfg, overrides = recipe
    memory_plan.main([str(cfg), "--gpus", "1", "--gpu-gib", "8", *overrides])
    last = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert last[:2] == ["plan:", "peak_gib"] and 0 < float(last[2]) < 8 and last[6] == "yes"


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    from fastross.export import main

    out = tmp_path_factory.mktemp("default_export") / "llava"
    assert main([str(run_dir), "--out", str(out)]) == 0
    return out


def test_default_save_export_generate_eval(kind, run_dir, exported, synth_data, tmp_path, capsys):
    """The export loads in transformers with every weight in place and gives fastross's logits (1e-4) and greedy
    answer; fastross.generate and fastross.eval load the run (where SigLIP crashed) and answer as it does."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from fastross import eval as fe, generate

    theirs, info = AutoModelForImageTextToText.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weight
    proc = AutoProcessor.from_pretrained(exported, use_fast=False)
    loaded = generate.load(run_dir)  # where SigLIP crashed
    assert loaded.model.vision.kind.name == kind
    ours = loaded.model
    record = json.loads((synth_data / "eval.json").read_text())[0]  # the held-out benchmark's first question
    prompt, image = record["conversations"][0]["value"], synth_data / "images" / record["image"]
    question = prompt.replace("<image>", "").strip()
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    hf = proc(
        text=proc.apply_chat_template(user, add_generation_prompt=True), images=Image.open(image), return_tensors="pt"
    )
    mb = generate.micro_batch(
        generate.prompt_ids(loaded, prompt, True),
        hf.pixel_values,
        theirs.config.image_token_id,
        theirs.config.image_seq_length,
    )
    assert torch.equal(hf.input_ids, mb.input_ids)  # the export's prompt and processor are fastross's
    with torch.no_grad():
        want = ours.llm.get_output_embeddings()(ours.hidden_states(mb))
        got = theirs.eval()(**hf).logits[0]
    err = (got - want).abs().max().item()
    print(f"default_save {kind}: export logits max |diff| {err:.2e}")
    assert err <= 1e-4

    capsys.readouterr()
    assert (
        generate.main(["--model", str(run_dir), "--prompt", prompt, "--image", str(image), "--max-new-tokens", "4"])
        == 0
    )
    answer = capsys.readouterr().out.strip()
    assert answer == generate.answer(loaded, [(prompt, image)], generate.Sampling(4))[0]
    with torch.no_grad():
        out = theirs.generate(**hf, max_new_tokens=4, do_sample=False)
    assert proc.tokenizer.decode(out[0, hf.input_ids.shape[1] :], skip_special_tokens=True).strip() == answer

    assert (
        fe.main(
            [
                "--model",
                str(run_dir),
                "--data",
                str(synth_data / "eval.json"),
                "--out",
                str(tmp_path / "eval"),
                "--limit",
                "1",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in (tmp_path / "eval" / "items.jsonl").read_text().splitlines()]
    assert len(rows) >= 1 and rows[0]["prediction"] == answer

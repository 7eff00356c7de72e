"""fastross.convert_checkpoint: a reference ROSS checkpoint (written here as the reference code saves one:
tests/test_ross_format.py's writer) imported in one command, then read by model.init_from, export, generate and eval.

The converted run's model gives the logits of the reference import itself (ross_format.load_into: max |diff| 0.0) and
the reference's own inference path's (1e-4, as tests/test_ross_format.py); a checkpoint without denoiser tensors needs
--fresh-denoiser; what SRC's config cannot give is asked for by the flag that gives it.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from fastross import convert_checkpoint as cc, ross_format
from test_ross_format import NET, model_cfg, reference_logits, reference_tensors, write_reference


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory):
    """A ross_qwen2 folder whose config names the tiny tower, VAE and (as _name_or_path) base LLM, and its tensors."""
    tensors = reference_tensors(tiny_models)
    return write_reference(tmp_path_factory.mktemp("ref") / "ross-qwen2-siglip", tensors, tiny_models), tensors


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    src, _ = reference
    out = tmp_path_factory.mktemp("converted") / "run"
    assert cc.main([str(src), "--out", str(out)]) == 0
    return out


def prompt(tokenizer, image_id):
    pre = tokenizer("A chat. USER: ", add_special_tokens=False).input_ids
    post = tokenizer("\nWhat is shown? ASSISTANT:", add_special_tokens=False).input_ids
    return pre, post, torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def logits(model, ids, pixels, image_id):
    from fastross.generate import micro_batch

    with torch.no_grad():
        return model.llm.get_output_embeddings()(
            model.hidden_states(micro_batch(ids, pixels, image_id, model.num_visual_tokens))
        )


def test_convert_checkpoint_logits_equal_the_reference_import(reference, converted, tiny_models, tokenizer):
    """generate.load(RUN) is the model ross_format.load_into(SRC) makes, to the bit, and the reference's logits."""
    from fastross.generate import load
    from fastross.model.ross import RossModel

    src, tensors = reference
    loaded = load(converted)
    cfg = loaded.model  # built from the run's config: the architecture SRC's config gave
    assert (len(cfg.denoiser.blocks), cfg.denoiser.x_embed.out_features) == (2, 64)
    assert (loaded.template, loaded.aspect) == ("qwen2_ross", "pad")
    direct = RossModel(model_cfg(tiny_models), "sdpa", seed=0).eval()
    ross_format.load_into(src, direct)
    got_state, want_state = loaded.model.state_dict(), direct.state_dict()
    assert got_state.keys() == want_state.keys() | {k for k in got_state if k.startswith("vae.")}  # + SRC's VAE
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    image_id = loaded.image_token_id
    pre, post, pixels = prompt(tokenizer, image_id)
    got = logits(loaded.model, pre + [image_id] + post, pixels, image_id)
    want = logits(direct, pre + [image_id] + post, pixels, image_id)
    err = (got - want).abs().max().item()
    ref = got - reference_logits(tensors, tiny_models, pre + [ross_format.IMAGE_TOKEN_INDEX] + post, pixels)
    print(
        f"convert_checkpoint: logits against the reference import max |diff| {err:.1e}, against the reference's "
        f"inference {ref.abs().max().item():.1e}"
    )
    assert err == 0.0 and ref.abs().max().item() <= 1e-4


def test_convert_checkpoint_is_read_by_init_from_export_and_eval(
    converted, reference, tiny_models, synth_data, tmp_path
):
    from fastross.checkpoint import read_checkpoint, resolve
    from fastross.config import load as load_config
    from fastross.eval import main as eval_main
    from fastross.export import load_export, main as export_main
    from fastross.model.ross import RossModel
    from fastross.weights import load_model_weights

    ckpt = resolve(converted)
    assert ckpt == converted / "checkpoints" / cc.STEP
    cfg = load_config(str(ckpt / "config.yaml"))  # valid as it stands: every folder it names exists
    assert cfg.model.vision_path == str(tiny_models / "vision") and cfg.data.shards == str(converted / "data")
    # model.init_from=RUN, as a training run with the config's architecture loads it (DCP, strict)
    fresh = RossModel(cfg.model, "sdpa", seed=7)
    assert load_model_weights(converted, fresh) == ckpt

    _, _, state = read_checkpoint(converted)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    # the Llava export reads it back bit for bit; eval answers its first question
    assert export_main([str(converted), "--out", str(tmp_path / "llava")]) == 0
    back = load_export(tmp_path / "llava")
    assert all(torch.equal(back[k], state[k]) for k in back)
    assert (
        eval_main(
            [
                "--model",
                str(converted),
                "--data",
                str(synth_data / "eval.json"),
                "--out",
                str(tmp_path / "e"),
                "--limit",
                "2",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["questions"] >= 2


def test_convert_checkpoint_fresh_denoiser(reference, tiny_models, tmp_path, capsys):
    """No DiT tensors: refused naming --fresh-denoiser; with it, a training run's fresh denoiser (its seed) beside
    the file's other tensors."""
    from fastross.checkpoint import read_checkpoint
    from fastross.model.ross import RossModel

    src, tensors = reference
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({k: v for k, v in tensors.items() if not k.startswith(NET)}, str(bare / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    del cfg["mm_inv_projector_type"]  # a run without ROSS's denoiser names none
    (bare / "config.json").write_text(json.dumps(cfg))
    assert cc.main([str(bare), "--out", str(tmp_path / "no")]) == 2
    assert "holds no denoiser tensors (model.mm_inv_projector.net.*): pass --fresh-denoiser" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
    out = tmp_path / "run"
    assert (
        cc.main(
            [
                str(bare),
                "--out",
                str(out),
                "--fresh-denoiser",
                "--seed",
                "4",
                "model.denoiser.depth=1",
                "model.denoiser.width=32",
                "model.denoiser.heads=4",
            ]
        )
        == 0
    )
    assert "holds no denoiser: a fresh one (seed 4, dit depth 1 width 32)" in capsys.readouterr().out
    _, run_cfg, state = read_checkpoint(out)
    want = RossModel(run_cfg.model, "sdpa", seed=4).state_dict()  # what a training run with seed 4 starts from
    den = [k for k in state if k.startswith("denoiser.")]
    assert den and all(torch.equal(state[k], want[k]) for k in den)
    assert torch.equal(state["projector.0.weight"], tensors["model.mm_projector.0.weight"].float())


def test_convert_checkpoint_asks_for_what_src_cannot_give(reference, tiny_models, tmp_path, capsys):
    from fastross import config

    src, _ = reference
    hub = tmp_path / "hub"
    hub.mkdir()
    for f in src.iterdir():
        (hub / f.name).symlink_to(f)
    (hub / "config.json").unlink()
    cfg = json.loads((src / "config.json").read_text())
    (hub / "config.json").write_text(
        json.dumps(
            cfg | {"mm_vision_tower": "google/siglip-so400m-patch14-384", "_name_or_path": "Qwen/Qwen2-7B-Instruct"}
        )
    )
    assert cc.main([str(hub), "--out", str(tmp_path / "a")]) == 2
    assert (
        "mm_vision_tower is 'google/siglip-so400m-patch14-384', not a local folder here: pass --vision DIR"
        in capsys.readouterr().err
    )
    assert cc.main([str(hub), "--out", str(tmp_path / "b"), "--vision", str(tiny_models / "vision")]) == 2
    assert (
        "_name_or_path is 'Qwen/Qwen2-7B-Instruct', not a local folder here: pass --llm DIR" in capsys.readouterr().err
    )
    assert (
        cc.main(
            [
                str(hub),
                "--out",
                str(tmp_path / "c"),
                "--vision",
                str(tiny_models / "vision"),
                "--llm",
                str(tiny_models / "llm"),
            ]
        )
        == 0
    )
    from fastross.checkpoint import resolve

    assert resolve(tmp_path / "c") == tmp_path / "c" / "checkpoints" / cc.STEP  # verified against its manifest
    # model.llm_path or generate's --model at the reference folder itself: the message says what to do
    from fastross.generate import load

    with pytest.raises(
        FileNotFoundError, match="reference ROSS checkpoint: import it once with `python -m fastross.convert_checkpoint"
    ):
        load(src)
    with pytest.raises(
        config.ConfigError,
        match=r"is a reference ROSS checkpoint \(ross_qwen2\), not an LLM folder: "
        r"import it once with `python -m fastross.convert_checkpoint",
    ):
        config.load(
            None,
            [
                f"model.vision_path={tiny_models / 'vision'}",
                f"model.llm_path={src}",
                f"data.shards={tmp_path / 'c' / 'data'}",
            ],
        )

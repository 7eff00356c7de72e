"""fastross.generate: the KV-cached decoder against the no-cache training forward, batches against one by one,
seeded sampling, top-p, and the command line on a run folder."""

import json

import pytest
import torch

from fastross.generate import Prompt, Sampling, decode, greedy, top_p_filter

QUESTIONS = ("What shape is in the picture?", "Is there a red circle in the image?", "How many shapes are there?")


@pytest.fixture(scope="module")
def model(tiny_models):
    from fastross.config import DenoiserConfig, ModelConfig
    from fastross.model.ross import RossModel

    cfg = ModelConfig(
        vision_path=str(tiny_models / "vision"),
        llm_path=str(tiny_models / "llm"),
        fused_ce=False,
        denoiser=DenoiserConfig(depth=1, width=32, heads=4),
    )
    model = RossModel(cfg, "sdpa", seed=0).eval()
    # make_tiny's weights (std 0.02) answer every prompt with one repeated token: redraw the LLM's and the projector's
    # matrices at unit gain, the embedding and an untied head with rows of norm 1, so that no token wins every argmax
    # and answers depend on the prompt and the image
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*model.llm.parameters(), *model.projector.parameters()]:
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        emb = model.llm.get_input_embeddings().weight
        emb.copy_(emb / emb.norm(dim=1, keepdim=True))
        head = torch.randn(emb.shape, generator=g)
        model.llm.lm_head.weight = torch.nn.Parameter(head / head.norm(dim=1, keepdim=True))
    return model


def prompts(tokenizer, model, image: bool = True) -> list[Prompt]:
    """Prompts of different lengths, each with its own random image."""
    from fastross.data import templates

    rng = torch.Generator().manual_seed(0)
    size = model.vision.grid * 8  # the tiny tower's 8-pixel patches
    out = []
    for q in QUESTIONS:
        text = templates.ROSS_SYSTEM + " USER: " + (templates.IMAGE_TOKEN + "\n" if image else "") + q + " ASSISTANT:"
        ids = tokenizer(text, add_special_tokens=False).input_ids
        out.append(Prompt(ids, torch.randn(3, size, size, generator=rng) if image else None))
    return out


def test_cached_greedy_equals_the_training_forward(model, tokenizer):
    """The KV-cached, sdpa decoder gives greedy()'s tokens (the whole sequence through the packed training forward at
    every step), token for token."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    seen = set()
    for p in prompts(tokenizer, model):
        want = greedy(model, p.input_ids, p.pixel_values[None], image_id, 10)
        got = decode(model, [p], image_id, Sampling(max_new_tokens=10), None)[0]
        assert got == want and len(want) == 10
        seen |= set(want)
    assert len(seen) >= 10  # not one repeated token


@pytest.mark.parametrize("sampling", [Sampling(max_new_tokens=8), Sampling(8, temperature=1.0, top_p=0.9, seed=3)])
def test_batched_equals_one_by_one(model, tokenizer, sampling):
    """Left-padded batches (prompts of three lengths, with and without images) answer as each prompt alone."""
    image_id, pad = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id
    ps = prompts(tokenizer, model) + prompts(tokenizer, model, image=False)
    assert len({len(p.input_ids) for p in ps}) >= 3
    alone = [decode(model, [p], image_id, sampling, None, pad)[0] for p in ps]
    together = decode(model, ps, image_id, sampling, None, pad)
    assert together == alone
    assert len({tuple(x) for x in alone}) >= 4  # the prompts (and images) lead to different answers


def test_sampling_is_seeded(model, tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ps = prompts(tokenizer, model)
    run = lambda seed: decode(model, ps, image_id, Sampling(12, temperature=1.0, seed=seed), None)  # noqa: E731
    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c and all(len(x) == 12 for x in a)
    assert a != decode(model, ps, image_id, Sampling(12), None)  # at temperature 1 over a random model: not greedy


def test_eos_ends_a_sample(model, tokenizer):
    """A sample stops at eos (kept as its last token); the others go on."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ps = prompts(tokenizer, model)
    full = decode(model, ps, image_id, Sampling(max_new_tokens=6), None)
    eos = full[0][2]
    got = decode(model, ps, image_id, Sampling(max_new_tokens=6), eos)
    assert len(got[0]) <= 3
    for g, f in zip(got, full):
        assert g == (f[: f.index(eos) + 1] if eos in f else f)
    assert any(eos not in f for f in full)  # and one went on


def test_top_p_filter_by_hand():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.97, 0.01, 0.01, 0.01]])
    # row 0, sorted 0.5 0.25 0.15 0.1: the mass before each is 0, 0.5, 0.75, 0.9 -> top_p 0.8 keeps the first three
    got = top_p_filter(probs, 0.8)
    assert torch.equal(got, torch.tensor([[0.0, 0.5, 0.15, 0.25], [0.97, 0.0, 0.0, 0.0]]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


@pytest.mark.slow
def test_cli_on_a_run_folder(run_dir, synth_data, tmp_path, capsys):
    """--prompt/--image and --batch on a trained run: the answers are the cached decoder's on the checkpoint's
    weights, the batch file's answers equal the single ones."""
    from fastross.checkpoint import read_checkpoint
    from fastross.generate import answer, load, main

    loaded = load(run_dir)
    _, _, state = read_checkpoint(run_dir)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert loaded.template == "qwen2_ross" and loaded.aspect == "pad"

    image = synth_data / "images" / "shapes_00001.png"
    args = ["--model", str(run_dir), "--max-new-tokens", "6"]
    assert main([*args, "--image", str(image), "--prompt", QUESTIONS[0]]) == 0
    single = capsys.readouterr().out.strip()
    assert single == answer(loaded, [(QUESTIONS[0], image)], Sampling(6))[0]

    batch = tmp_path / "batch.jsonl"
    rows = [
        {"id": "a", "image": str(image), "prompt": QUESTIONS[0]},
        {"prompt": "What is 2 plus 3?"},
        {"id": "c", "image": str(synth_data / "images" / "photo_coffee.png"), "prompt": QUESTIONS[2]},
    ]
    batch.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    assert main([*args, "--batch", str(batch), "--batch-size", "2", "--out", str(out)]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["a", 2, "c"]
    assert got[0]["answer"] == single
    for g, r in zip(got, rows):
        assert g["answer"] == answer(loaded, [(r["prompt"], r.get("image"))], Sampling(6))[0]
    with pytest.raises(FileNotFoundError, match="no fastross export"):
        load(tmp_path)

    # an export of the run answers the same, with the template and image aspect read from the export itself
    from fastross.export import main as export

    assert export([str(run_dir), "--out", str(tmp_path / "llava")]) == 0
    capsys.readouterr()
    exported = load(tmp_path / "llava")
    assert (exported.template, exported.aspect, exported.image_token_id) == ("qwen2_ross", "pad", loaded.image_token_id)
    assert (
        main(
            [
                "--model",
                str(tmp_path / "llava"),
                "--max-new-tokens",
                "6",
                "--image",
                str(image),
                "--prompt",
                QUESTIONS[0],
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == single

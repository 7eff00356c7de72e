"""The packed model against a per-sample loop, the image-less mask, and sample isolation."""

import pytest
import torch

from fastross.config import DenoiserConfig, ModelConfig
from fastross.data.batch import Collator
from fastross.data.images import ImageSpec
from fastross.data.schema import ShardMeta
from fastross.model.ross import RossModel


@pytest.fixture(scope="module")
def model(tiny_models):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision_path=str(tiny_models / "vision"),
        llm_path=str(tiny_models / "llm"),
        vae_path=str(tiny_models / "vae"),
        denoiser=DenoiserConfig(kind="dit", depth=2, width=32, heads=4, replicas=4),
        fused_ce=False,
    )
    m = RossModel(cfg)
    # Open the adaLN-Zero gates so the denoiser's output depends on everything it sees.
    with torch.no_grad():
        for p in m.denoiser.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.05)
    return m.double().float()


@pytest.fixture(scope="module")
def collate(stage2_shards, tiny_models, model):
    return Collator(
        meta=ShardMeta.read(stage2_shards),
        image=ImageSpec.from_pretrained(str(tiny_models / "vision")),
        latent_channels=16,
        replicas=4,
        seed=0,
    )


def pick(samples, with_image: int, without: int):
    img = [s for s in samples if len(s["image"])][:with_image]
    txt = [s for s in samples if not len(s["image"])][:without]
    return img + txt


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_equals_per_sample_loop(model, collate, stage2_samples):
    samples = pick(stage2_samples, 3, 2)
    samples = [samples[0], samples[3], samples[1], samples[4], samples[2]]  # interleave text-only ones
    model.zero_grad()
    out = model(collate(samples, step=7))
    (out.text + out.recon).backward()
    packed = grads(model)

    model.zero_grad()
    text = recon = 0
    for s in samples:
        o = model(collate([s], step=7))
        (o.text + o.recon).backward()
        text, recon = text + o.text.detach(), recon + o.recon.detach()
    loop = grads(model)
    torch.testing.assert_close(out.text.detach(), text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.recon.detach(), recon, rtol=1e-5, atol=1e-6)
    assert packed.keys() == loop.keys() and len(packed) > 10
    for name in packed:
        # fp32 sums in another order: the error is bounded relative to the gradient's scale
        err = (packed[name] - loop[name]).abs().max().item()
        assert err <= 1e-5 * loop[name].abs().max().item() + 1e-9, (name, err)


def test_image_less_samples_add_nothing_to_recon(model, collate, stage2_samples):
    txt = pick(stage2_samples, 0, 3)
    mb = collate(txt, step=0)
    assert mb.num_images == 0 and mb.image_weight.sum() == 0
    with torch.no_grad():
        out = model(mb)
    assert out.recon.item() == 0.0  # exactly nothing
    assert out.text.item() > 0

    # At the trainer's level: the same images with or without a text-only micro-batch beside
    # them give the same reconstruction loss (the image count, not the sample count, divides).
    img = pick(stage2_samples, 2, 0)
    with torch.no_grad():
        a = model(collate(img, step=0))
        b = model(collate(txt, step=0))
    n_img = 2
    assert (a.recon / n_img).item() == ((a.recon + b.recon) / n_img).item()


def test_packed_samples_do_not_attend_across_boundaries(model, collate, stage2_samples):
    samples = pick(stage2_samples, 2, 2)
    mb = collate(samples, step=0)
    with torch.no_grad():
        h = model.hidden_states(mb)
    changed = dict(samples[1])
    ids = changed["input_ids"].copy()
    ids[-3:] = (ids[-3:] + 17) % 1000  # other tokens at the end of sample 1
    changed["input_ids"] = ids
    mb2 = collate([samples[0], changed, samples[2], samples[3]], step=0)
    with torch.no_grad():
        h2 = model.hidden_states(mb2)
    cu = mb.cu_seqlens.tolist()
    for i in range(4):
        a, b = h[cu[i] : cu[i + 1]], h2[cu[i] : cu[i + 1]]
        if i == 1:
            assert not torch.allclose(a[-3:], b[-3:])
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"sample {i} moved")


def test_stored_moments_equal_vae_on_the_fly(model, collate, stage2_samples):
    """The converter's stored posterior moments give the same target as encoding at train time."""
    img = pick(stage2_samples, 2, 0)
    mb = collate(img, step=3)
    stored = model.latent_x0(mb)
    mb.latent_mean = mb.latent_std = None
    fly = model.latent_x0(mb)
    torch.testing.assert_close(stored, fly, rtol=1e-5, atol=1e-5)


def test_batch_layout(collate, stage2_samples):
    samples = pick(stage2_samples, 2, 1)
    mb = collate(samples, step=0)
    n = [len(s["input_ids"]) - (1 if len(s["image"]) else 0) + (64 if len(s["image"]) else 0) for s in samples]
    assert mb.cu_seqlens.tolist() == [0, n[0], n[0] + n[1], sum(n)]
    assert mb.position_ids[0, : n[0]].tolist() == list(range(n[0]))
    assert mb.position_ids[0, n[0]].item() == 0
    assert (mb.input_ids[0, mb.visual_pos] == collate.meta.image_token_id).all()
    assert mb.visual_pos.numel() == 2 * 64
    assert [s["length"] for s in samples] == n
    # every supervised target is the label of the next position within the same sample
    assert mb.num_text_tokens == sum(int((s["labels"][1:] != -100).sum()) for s in samples)

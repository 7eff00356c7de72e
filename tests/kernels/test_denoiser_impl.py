"""The assembled denoiser: impl="triton" against impl="torch" on the same parameters, and in training;
impl="torch" against a copy of the eager forward it replaced (the reference must not move)."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fastross.demo import torchrun_cmd
from fastross.model.denoiser import OPS, Denoiser
from kernel_checks import rel_err


def build(kind, impl, seed=0):
    """A small denoiser with its adaLN-Zero gates opened (so every path carries signal), by impl."""
    torch.manual_seed(seed)
    m = Denoiser(kind, cond_width=24, width=40, depth=2, heads=4, grid=3, channels=20, impl=impl)
    with torch.no_grad():
        for p in m.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.2)
    return m


def make_pair(kind, seed=0):
    """impl "torch" and impl "triton" built by impl, the second loading the first's state dict."""
    ref = build(kind, "torch", seed)
    fused = Denoiser(kind, cond_width=24, width=40, depth=2, heads=4, grid=3, channels=20, impl="triton")
    fused.load_state_dict(ref.state_dict())  # strict: the state dicts name the same tensors
    assert fused.state_dict().keys() == ref.state_dict().keys()
    assert all(blk.ops is OPS["triton"] for blk in fused.blocks) and fused.final.ops is OPS["triton"]
    return ref, fused


def eager_forward_67b00dd(m, x_t, t, cond):
    """The impl="torch" forward as it was at 67b00dd (per-block adaLN with its own SiLU, modulate), copied."""

    def modulate(x, shift, scale):
        return x * (1 + scale) + shift

    def ln(x):
        return F.layer_norm(x, (x.shape[-1],), eps=1e-6)

    n, r, tokens, ch = x_t.shape
    dtype = m.x_embed.weight.dtype
    x = m.x_embed(x_t.to(dtype))
    if m.pos_embed is not None:
        x = x + m.pos_embed.to(dtype)
    x = x.reshape(n * r, tokens, -1)
    c = m.c_embed(cond.to(dtype))[:, None] + m.t_embed(t)[:, :, None]
    c = c.reshape(n * r, tokens, -1)
    for blk in m.blocks:
        if m.kind == "dit":
            sh1, sc1, g1, sh2, sc2, g2 = blk.ada(c).chunk(6, dim=-1)
            x = x + g1 * blk.attn(modulate(ln(x), sh1, sc1))
            x = x + g2 * blk.mlp(modulate(ln(x), sh2, sc2))
        else:
            sh, sc, g = blk.ada(c).chunk(3, dim=-1)
            x = x + g * blk.mlp(modulate(ln(x), sh, sc))
    sh, sc = m.final.ada(c).chunk(2, dim=-1)
    return m.final.linear(modulate(ln(x), sh, sc)).flatten(0, 1)  # the denoiser returns rows (b * N, C)


def run(model, x, t, cond, grad_out, forward=None):
    model.zero_grad()
    cond = cond.clone().requires_grad_(True)
    out = forward(model, x, t, cond) if forward else model(x, t, cond)
    out.backward(grad_out.to(out.dtype).view_as(out))
    grads = {n: p.grad.float() for n, p in model.named_parameters()}
    grads["cond"] = cond.grad.float()
    return out.detach().float(), grads


def inputs(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 9, 20, generator=g)  # n = 2 images, R = 3 replicas, 9 tokens, 20 channels
    t = torch.randint(0, 1000, (2, 3), generator=g)
    cond = torch.randn(2, 9, 24, generator=g).to(dtype)
    return x, t, cond, torch.randn(6, 9, 20, generator=g)


@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_torch_impl_is_the_previous_eager_forward(kind):
    """The ops-holding impl="torch" computes what the eager forward it replaced did: the output bit for bit
    (the same ops in the same order: SiLU(c) once instead of per block gives the same numbers), every
    gradient to fp32 rounding (the shared SiLU sums the blocks' adaLN gradients before its backward,
    not after: a different summation order)."""
    m = build(kind, "torch")
    x, t, cond, gout = inputs(torch.float32)
    got, got_g = run(m, x, t, cond, gout)
    want, want_g = run(m, x, t, cond, gout, forward=eager_forward_67b00dd)
    assert torch.equal(got, want)
    for name in want_g:
        assert rel_err(got_g[name], want_g[name]) <= 1e-6, name


@pytest.mark.parametrize("elements", [1 << 14, 1 << 20])
@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_triton_denoiser_equals_torch_fp32(kind, elements, monkeypatch):
    """At the kernel tests' small interpreter tiles (every kernel's tiles cross) and at training's (one tile)."""
    monkeypatch.setenv("FASTROSS_INTERPRET_ELEMENTS", str(elements))
    ref, fused = make_pair(kind)
    x, t, cond, gout = inputs(torch.float32)
    want, want_g = run(ref, x, t, cond, gout)
    got, got_g = run(fused, x, t, cond, gout)
    assert rel_err(got, want) <= 1e-5
    assert got_g.keys() == want_g.keys() and len(got_g) > 10
    for name in want_g:
        assert rel_err(got_g[name], want_g[name]) <= 1e-5, name


def test_triton_denoiser_embeds_the_condition_once_per_image():
    _, fused = make_pair("dit")
    seen = []
    fused.c_embed.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    x, t, cond, _ = inputs(torch.float32)
    fused(x, t, cond)
    assert seen == [torch.Size([2, 9, 24])]  # 2 images, not 2 x 3 replicas


@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_triton_denoiser_bf16_within_torch_bf16_error(kind):
    ref, fused = make_pair(kind, seed=2)
    x, t, cond, gout = inputs(torch.bfloat16, seed=3)
    want, want_g = run(ref, x, t, cond.float(), gout)  # fp32 reference
    low, low_g = run(copy.deepcopy(ref).bfloat16(), x, t, cond, gout)  # PyTorch's own bf16
    got, got_g = run(fused.bfloat16(), x, t, cond, gout)
    for name, a, lo, hi in [("output", got, low, want)] + [(n, got_g[n], low_g[n], want_g[n]) for n in want_g]:
        fused_err, torch_err = (a - hi).abs().max().item(), (lo - hi).abs().max().item()
        assert fused_err <= 2 * torch_err + 1e-3 * hi.abs().max().item(), (name, fused_err, torch_err)


def test_tiny_ross_trains_the_same_with_triton_and_torch(tiny_models, stage2_shards, stage2_samples, training_tiles):
    """20 optimizer steps of the tiny ROSS model, fp32, same data and keys: the losses agree step by step."""
    from fastross.config import DenoiserConfig, ModelConfig
    from fastross.data.batch import Collator
    from fastross.data.images import ImageSpec
    from fastross.data.schema import ShardMeta
    from fastross.model.ross import RossModel

    torch.manual_seed(0)
    cfg = ModelConfig(
        vision_path=str(tiny_models / "vision"),
        llm_path=str(tiny_models / "llm"),
        fused_ce=False,
        denoiser=DenoiserConfig(kind="dit", depth=2, width=32, heads=4, replicas=4, impl="torch"),
    )
    models = {"torch": RossModel(cfg)}
    models["triton"] = RossModel(replace(cfg, denoiser=replace(cfg.denoiser, impl="triton")))
    models["triton"].load_state_dict(models["torch"].state_dict())
    collate = Collator(
        meta=ShardMeta.read(stage2_shards),
        image=ImageSpec.from_pretrained(str(tiny_models / "vision")),
        latent_channels=16,
        replicas=4,
        seed=0,
    )
    img = [s for s in stage2_samples if len(s["image"])]
    txt = [s for s in stage2_samples if not len(s["image"])]
    # micro-batches of 2 images + 1 text sample; every 7th is text-only (the dummy image, weight 0)
    batches = [
        collate(txt[i : i + 2] if i % 7 == 6 else img[2 * i : 2 * i + 2] + txt[i : i + 1], step=i) for i in range(20)
    ]
    losses = {}
    for impl, model in models.items():
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses[impl] = []
        for mb in batches:
            opt.zero_grad()
            out = model(mb)
            (out.text / max(mb.num_text_tokens, 1) + out.recon / max(mb.num_images, 1)).backward()
            opt.step()
            losses[impl].append((out.text.item(), out.recon.item()))
    torch_l, triton_l = torch.tensor(losses["torch"]), torch.tensor(losses["triton"])
    assert triton_l[6, 1] == 0 and torch_l[6, 1] == 0  # the text-only micro-batch adds no recon loss
    recon = torch_l[:, 1] / 2
    assert recon[-5:].mean() < 0.95 * recon[:5].mean()  # the denoiser learns: down by 5 % or more in 20 steps
    torch.testing.assert_close(triton_l, torch_l, rtol=1e-5, atol=1e-7)  # seen: 7e-8 relative


@pytest.mark.slow
def test_triton_impl_on_two_fsdp2_ranks_matches_torch_on_one(tiny_models, stage2_shards, tmp_path, training_tiles):
    """impl=triton under torchrun + FSDP2 (2 gloo ranks, the denoiser one FSDP unit whose kernels read
    the unsharded parameters) gives the losses and gradient norm of impl=torch on 1 rank.

    Judged by the metrics the runs wrote (CPU_AND_GPU.md: gloo runs occasionally abort at exit)."""
    import json
    import subprocess

    from devtools.faults import write_config

    metrics = {}
    for impl, ranks in (("torch", 1), ("triton", 2)):
        run_dir = tmp_path / impl
        over = dict(denoiser={"impl": impl}, max_steps=2, ckpt_every=10)
        path = write_config(tmp_path / f"{impl}.yaml", tiny_models, stage2_shards, run_dir, **over)
        p = subprocess.run(torchrun_cmd(ranks, path), capture_output=True, text=True, timeout=600)
        assert "train: done" in p.stdout + p.stderr, (p.stdout + p.stderr)[-4000:]
        metrics[impl] = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics["triton"]] == [m["step"] for m in metrics["torch"]] == [1, 2]
    for a, b in zip(metrics["torch"], metrics["triton"]):
        for key in ("text_loss", "recon_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key  # seen: 5e-6 on grad_norm


def test_auto_impl_resolves_by_device():
    """model.denoiser.impl=auto: the Triton kernels on CUDA, their PyTorch twins elsewhere (Triton has no CPU
    backend); an explicit impl is kept, and a wrong one is named."""
    from fastross.model.denoiser import resolve_impl

    assert resolve_impl("auto", "cuda") == "triton"
    assert resolve_impl("auto", "cpu") == "torch"
    for impl in ("torch", "triton"):
        assert resolve_impl(impl, "cpu") == impl and resolve_impl(impl, "cuda") == impl
    with pytest.raises(ValueError, match="model.denoiser.impl must be one of 'auto', 'torch', 'triton', got 'cuda'"):
        resolve_impl("cuda", "cpu")


def test_auto_impl_builds_the_ops_of_the_device(tiny_models):
    """fastross.build resolves impl=auto for the device a model will run on: the refs and the materialised eps loss
    for a CPU, the kernels and the fused loss for CUDA (built on the meta device: no GPU needed). RossModel itself
    takes a resolved impl and refuses auto, saying where it is resolved."""
    from fastross import build
    from fastross.config import DenoiserConfig, ModelConfig
    from fastross.model import diffusion
    from fastross.model.ross import RossModel

    cfg = ModelConfig(
        vision_path=str(tiny_models / "vision"),
        llm_path=str(tiny_models / "llm"),
        fused_ce=False,
        denoiser=DenoiserConfig(kind="dit", depth=1, width=32, heads=4, replicas=4, impl="auto"),
    )
    for device, want in (("cpu", "torch"), ("cuda", "triton")):
        model = build.meta(cfg, "sdpa", device)
        assert model.denoiser.impl == want and all(blk.ops is OPS[want] for blk in model.denoiser.blocks)
        assert model.eps_loss is diffusion.EPS_LOSSES[want]
    assert diffusion.EPS_LOSSES["torch"] is diffusion.eps_loss_materialised
    with pytest.raises(ValueError, match=r"got 'auto': resolve it for the device first \(fastross.build\)"):
        RossModel(cfg, meta=True)


def test_impl_names_are_the_config_fields():
    """model.denoiser.impl's names are declared once, on the config field: the denoiser's ops and the eps losses
    are keyed by exactly those names less auto."""
    from fastross.config import DenoiserConfig, choices
    from fastross.model import diffusion
    from fastross.model.denoiser import IMPLS

    assert IMPLS == choices(DenoiserConfig, "impl") == ("auto", *OPS)
    assert tuple(diffusion.EPS_LOSSES) == tuple(OPS)

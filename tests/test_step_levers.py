"""The step's levers train the same model: activation checkpointing per layer, fused CE, Liger, compile.

Each lever is a switch of the typed config (docs/training.md, "The 7B step: levers"). Here each is checked in one
process on the tiny model (no FSDP) against the plain path; tests/test_golden.py holds them, under FSDP2 on 2 ranks,
to the committed golden losses.
"""

import copy

import pytest
import torch

from fastross.config import DenoiserConfig, ModelConfig
from fastross.data.batch import Collator
from fastross.data.images import ImageSpec
from fastross.data.schema import ShardMeta
from fastross.distributed import apply_activation_checkpointing
from fastross.model.ross import RossModel


def build(tiny_models, repeat_cond: bool = False, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision_path=str(tiny_models / "vision"),
        llm_path=str(tiny_models / "llm"),
        denoiser=DenoiserConfig(kind="dit", depth=2, width=32, heads=4, replicas=4, repeat_cond=repeat_cond),
        **kw,
    )
    m = RossModel(cfg)
    with torch.no_grad():  # open the adaLN-Zero gates so the denoiser's gradients are not all zero
        for p in m.denoiser.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.05)
    return m


@pytest.fixture(scope="module")
def collate(stage2_shards, tiny_models):
    return Collator(
        meta=ShardMeta.read(stage2_shards),
        image=ImageSpec.from_pretrained(str(tiny_models / "vision")),
        latent_channels=16,
        replicas=4,
        seed=0,
    )


@pytest.fixture(scope="module")
def batch(collate, stage2_samples):
    img = [s for s in stage2_samples if len(s["image"])][:2]
    txt = [s for s in stage2_samples if not len(s["image"])][:1]
    return collate([img[0], txt[0], img[1]], step=5)


def loss_and_grads(model, mb, text_scale: float = 1.0):
    """text_scale: the gradient reaching the text loss (training divides it by the global token count)."""
    model.zero_grad(set_to_none=True)
    out = model(mb)
    (out.text * text_scale + out.recon).backward()
    grads = {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return torch.stack([out.text.detach(), out.recon.detach()]), grads


@pytest.mark.parametrize("spec", ["full", "selective", ["selective", "none"], ["full*1", "selective*1"]])
def test_checkpoint_policies_give_the_same_losses_and_gradients(tiny_models, batch, spec):
    model = build(tiny_models, fused_ce=False)
    model.train()
    want, want_g = loss_and_grads(model, batch)
    ac = copy.deepcopy(model)
    policies = apply_activation_checkpointing(ac.llm.model.layers, spec)
    assert len(policies) == 2 and all(
        type(layer).__name__ == "CheckpointWrapper" for layer, p in zip(ac.llm.model.layers, policies) if p != "none"
    )
    got, got_g = loss_and_grads(ac, batch)
    # Recomputation in fp32 runs the same ops on the same inputs on the CPU: bit-identical.
    assert torch.equal(got, want)
    assert got_g.keys() == want_g.keys() and len(got_g) > 20
    for name in want_g:
        assert torch.equal(got_g[name], want_g[name]), name
    # the checkpoint wrapper leaves the state dict's names alone
    assert ac.state_dict().keys() == model.state_dict().keys()


def test_fused_ce_equals_plain_ce(tiny_models, batch):
    plain = build(tiny_models, fused_ce=False)
    fused = build(tiny_models, fused_ce=True)
    fused.load_state_dict(plain.state_dict())
    want, want_g = loss_and_grads(plain, batch, text_scale=1 / 7)  # a gradient of 1/7 reaches the fused loss
    got, got_g = loss_and_grads(fused, batch, text_scale=1 / 7)
    assert type(fused.text_loss).__name__ == "FusedLinearCrossEntropy"
    # fp32 logits summed in chunks instead of one matmul: rounding-level differences
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    # The kernel forms softmax - onehot chunk by chunk in fp32 (differences of ~1e-7 relative to the loss);
    # back through RMSNorm, attention and two layers they grow to 1.5e-5 of a gradient's scale at worst
    # (seen: layers.0.input_layernorm), so 1e-4 of each gradient's largest element is the bound.
    assert got_g.keys() == want_g.keys()
    for name in want_g:
        scale = want_g[name].abs().max().item()
        assert (got_g[name] - want_g[name]).abs().max().item() <= 1e-4 * scale + 1e-9, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ce_backends_equal_plain_ce(dtype):
    """FusedLinearCrossEntropy's two paths, Liger's kernel (CUDA; here in Triton's interpreter) and the chunked torch
    one (CPU), against plain CE: the loss and the gradients of hidden, weight and bias for an incoming gradient of
    1/7, over several chunks (CHUNK_ELEMENTS lowered) with ignored rows among them."""
    from fastross.model import text_loss as tl

    g = torch.Generator().manual_seed(0)
    k, h, v = 37, 24, 1000
    hidden = torch.randn(k, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    bias = (torch.randn(v, generator=g) * 0.1).to(dtype)
    targets = torch.randint(0, v, (k,), generator=g)
    targets[::5] = tl.IGNORE

    def run(module, with_bias):
        xs = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
        loss = module(xs[0], xs[1], xs[2] if with_bias else None, targets)
        (loss / 7).backward()
        return [loss.detach()] + [x.grad for x in (xs if with_bias else xs[:2])]

    old = tl.CHUNK_ELEMENTS
    tl.CHUNK_ELEMENTS = 8 * v  # 8 rows a chunk: 5 chunks, the last one short
    try:
        for with_bias in (False, True):
            want = run(tl.LinearCrossEntropy(), with_bias)
            for backend in ("torch", "liger"):
                got = run(tl.FusedLinearCrossEntropy(backend), with_bias)
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                for name, a, b in zip(("loss", "hidden", "weight", "bias"), got, want):
                    assert a.dtype == b.dtype, (backend, name)
                    scale = b.float().abs().max().item()
                    assert (a.float() - b.float()).abs().max().item() <= tol * scale, (backend, name, with_bias)
    finally:
        tl.CHUNK_ELEMENTS = old


def test_fused_ce_without_supervised_tokens_adds_nothing(tiny_models, collate, stage2_samples):
    model = build(tiny_models, fused_ce=True)
    img = [s for s in stage2_samples if len(s["image"])][0]
    mb = collate([img], step=0)
    mb.text_targets = torch.full_like(mb.text_targets, -100)  # as a micro-batch with no supervised token
    out = model(mb)
    out.text.backward()
    assert out.text.item() == 0.0
    assert model.llm.lm_head.weight.grad.abs().max().item() == 0.0


@pytest.mark.slow
def test_fused_ce_on_two_fsdp2_ranks_matches_plain_ce_on_one(tiny_models, stage2_shards, tmp_path):
    """model.fused_ce under torchrun + FSDP2 on 2 gloo ranks: Liger's kernel runs inside the root's forward, where
    lm_head is unsharded, and its weight gradient is reduce-scattered like any other. Two steps (the second sees
    the first's update) give the losses and gradient norm of plain CE on 1 rank.

    Two samples per step keep the supervised rows, which Liger's kernel walks one by one in Triton's interpreter
    (~40 ms each at the 152k vocabulary: `python benchmarks/text_loss.py`), to a few hundred."""
    from test_train import metrics as records, run, write_config

    metrics = {}
    for fused, ranks in ((False, 1), (True, 2)):
        run_dir = tmp_path / f"fused{fused}"
        cfg = write_config(
            tmp_path / f"fused{fused}.yaml", tiny_models, stage2_shards, run_dir, max_steps=2, ckpt_every=10
        )
        run(ranks, cfg, f"model.fused_ce={str(fused).lower()}", "data.global_batch=2", "data.workers=0")
        metrics[fused] = records(run_dir)
    assert [m["step"] for m in metrics[True]] == [m["step"] for m in metrics[False]] == [1, 2]
    assert all(m["text_tokens"] > 0 for m in metrics[True])
    for a, b in zip(metrics[False], metrics[True]):
        for key in ("text_loss", "recon_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_the_reference_recipes_switches_train_the_same_model(tiny_models, collate, stage2_shards, stage2_samples):
    """The first rung of benchmarks/throughput.py: padded micro-batches (data.packing=padded), logits at every
    position (model.ce_positions=all) and the condition repeated per replica (model.denoiser.repeat_cond) compute
    more, and give fastross's losses and gradients."""
    fast = build(tiny_models, fused_ce=False)
    ref = build(tiny_models, fused_ce=False, ce_positions="all", repeat_cond=True)
    ref.load_state_dict(fast.state_dict())
    img = [s for s in stage2_samples if len(s["image"])][:2]
    txt = [s for s in stage2_samples if not len(s["image"])][:1]
    samples = [img[0], txt[0], img[1]]
    packed = collate(samples, step=5)
    padded = Collator(
        meta=ShardMeta.read(stage2_shards), image=collate.image, latent_channels=16, replicas=4, seed=0, pad=True
    )(samples, step=5)
    lengths = packed.cu_seqlens.diff()
    assert padded.input_ids.shape[1] == 3 * int(lengths.max()) > packed.input_ids.shape[1]  # padded to the longest
    assert padded.num_text_tokens == packed.num_text_tokens and torch.equal(padded.text_targets, packed.text_targets)
    want, want_g = loss_and_grads(fast, packed, text_scale=1 / 7)
    got, got_g = loss_and_grads(ref, padded, text_scale=1 / 7)
    # The same terms summed in another order (CE over more rows, the ignored ones zero): fp32 rounding.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_g.keys() == want_g.keys()
    for name in want_g:
        scale = want_g[name].abs().max().item()
        assert (got_g[name] - want_g[name]).abs().max().item() <= 1e-4 * scale + 1e-9, name


def test_padded_plan_is_the_reference_split():
    from fastross.data.packing_planner import plan_padded_step, sample_cost

    lengths = [10, 40, 20, 30, 5, 50, 60, 70]
    plan = plan_padded_step(lengths, ranks=2, samples=3, attn_tokens=100.0)
    assert plan.micro_batches == [[[0, 1, 2], [3]], [[4, 5, 6], [7]]]  # contiguous shares, in order
    assert plan.costs[0] == pytest.approx(3 * sample_cost(40, 100.0) + sample_cost(30, 100.0))
    with pytest.raises(ValueError, match="divisible"):
        plan_padded_step(lengths[:7], ranks=2, samples=3, attn_tokens=100.0)

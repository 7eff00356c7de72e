"""train.compile: every LLM decoder layer and denoiser block compiled (Inductor, CPU here), few compiles over
packed micro-batches of changing length, and the same losses and gradients as eager."""

import random

import pytest
import torch

from fastross.distributed import compile_blocks
from test_step_levers import build, collate, loss_and_grads  # noqa: F401  (collate: a fixture)

pytestmark = pytest.mark.slow


def test_compiled_model_matches_eager_and_compiles_at_most_twice_per_block(tiny_models, collate, stage2_samples):  # noqa: F811 (the fixture imported above)
    from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics

    rng = random.Random(0)
    img = [s for s in stage2_samples if len(s["image"])]
    txt = [s for s in stage2_samples if not len(s["image"])]
    # 20 micro-batches: 1-4 samples, 0-4 images, lengths from ~60 to ~550 tokens
    mbs = [
        collate(rng.sample(img, k) + rng.sample(txt, rng.randint(0 if k else 1, 2)), step=i)
        for i, k in enumerate([4, 3, 1, 0, 2, 1, 4, 0, 3, 1, 2, 3, 1, 3, 0, 2, 1, 4, 2, 1])
    ]
    lengths = {mb.input_ids.shape[1] for mb in mbs}
    assert len(lengths) >= 15 and {mb.num_images for mb in mbs} == {0, 1, 2, 3, 4}

    eager = build(tiny_models, fused_ce=False)
    compiled = build(tiny_models, fused_ce=False)
    compiled.load_state_dict(eager.state_dict())
    assert compile_blocks(compiled) == 2 + 2 + 1  # 2 decoder layers, 2 DiT blocks, the final layer

    torch._dynamo.reset()
    clear_compilation_metrics()
    for i, mb in enumerate(mbs):
        got, got_g = loss_and_grads(compiled, mb)
        if i in (0, 3, 19):  # eager is the reference; a few of them suffice (the compiled graphs are reused)
            want, want_g = loss_and_grads(eager, mb)
            # Inductor fuses and reorders fp32 reductions: rounding-level differences
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            for name in want_g:
                scale = want_g[name].abs().max().item()
                assert (got_g[name] - want_g[name]).abs().max().item() <= 1e-4 * scale + 1e-8, (i, name)

    per_frame = {}
    for m in get_compilation_metrics():
        per_frame[(m.co_filename, m.co_name)] = per_frame.get((m.co_filename, m.co_name), 0) + 1
    # Same-class blocks share one compiled graph; a block may compile twice (once more when a size first
    # changes), never once per length.
    assert per_frame and max(per_frame.values()) <= 2, per_frame
    assert sum(per_frame.values()) <= 2 * 3  # decoder layer, DiT block, final layer: 3 functions

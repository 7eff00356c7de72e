"""Greedy decoding with fastross's own model: the reference an exported model's `generate` is checked against.

No KV cache: every step runs the whole sequence through `RossModel.hidden_states`, the training
forward, so the answer depends on nothing but the model the trainer trains (tests/test_export.py).
"""

from __future__ import annotations

import numpy as np
import torch

from fastross.data.batch import MicroBatch, TextSample, pack_text
from fastross.data.templates import IGNORE


def micro_batch(input_ids: list[int], pixel_values: torch.Tensor, image_token_id: int, num_visual: int) -> MicroBatch:
    """One prompt (one `<image>` id, pixel values (1, 3, S, S)) as a packed micro-batch of one sample, for inference."""
    ids = np.asarray(input_ids, np.int64)
    packed = pack_text([TextSample("prompt", ids, np.full(len(ids), IGNORE), True)], image_token_id, num_visual)
    n = len(packed.input_ids)
    one = torch.ones(1)
    return MicroBatch(
        input_ids=torch.from_numpy(packed.input_ids)[None], position_ids=torch.from_numpy(packed.position_ids)[None],
        cu_seqlens=torch.from_numpy(packed.cu_seqlens), doc_ids=torch.zeros(n, dtype=torch.long), max_seqlen=n,
        text_pos=torch.from_numpy(packed.text_pos), text_targets=torch.from_numpy(packed.text_targets),
        visual_pos=torch.from_numpy(packed.visual_pos), pixel_values=pixel_values, image_weight=one,
        t=torch.zeros(1, 1, dtype=torch.long), noise_keys=torch.zeros(1, dtype=torch.long),
        latent_mean=None, latent_std=None, num_images=1, num_text_tokens=0,
    )


@torch.no_grad()
def greedy(model, input_ids: list[int], pixel_values: torch.Tensor, image_token_id: int, max_new_tokens: int,
           eos_token_id: int | None = None) -> list[int]:
    """The new token ids (eos included when reached) of greedy decoding from a prompt with one image."""
    model.eval()
    ids, out = list(input_ids), []
    head = model.llm.get_output_embeddings()
    for _ in range(max_new_tokens):
        h = model.hidden_states(micro_batch(ids, pixel_values, image_token_id, model.num_visual_tokens))
        nxt = int(head(h[-1:]).argmax(-1))
        out.append(nxt)
        ids.append(nxt)
        if nxt == eos_token_id:
            break
    return out

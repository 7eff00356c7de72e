"""Answers from a fastross model: greedy or sampled decoding with a KV cache, batched; and the command line.

    python -m fastross.generate --model DIR --image IMG --prompt TEXT [--temperature T --top-p P --seed S]
    python -m fastross.generate --model DIR --batch FILE.jsonl [--out ANSWERS.jsonl]

DIR is a run folder (its newest checkpoint), one checkpoint, or a `python -m fastross.export` folder. The prompt is
rendered with the template the training data was converted with (the shards' `fastross.json`, or the export's
sidecar), and is the training sample's tokens before its answer.

Two decoders:
- `greedy`: no cache, every step runs the whole sequence through `RossModel.hidden_states`, the training forward; the
  reference that the cached decoder and an exported model's `generate` are checked against (tests/test_export.py);
- `decode`: a batch of prompts, left-padded, through the LLM with Hugging Face's sdpa attention and a `DynamicCache`;
  each new token costs one position per sample. Each sample samples from its own generator seeded by `seed`, so its
  answer does not depend on the batch it is in (tests/test_generate.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from fastross import build, config as fconfig
from fastross.checkpoint import resolve
from fastross.data import templates
from fastross.data.batch import MicroBatch, TextSample, pack_text
from fastross.data.images import ImageSpec, preprocess
from fastross.data.schema import ShardMeta
from fastross.data.sources import meta_folder
from fastross.data.templates import IGNORE
from fastross.export import CONFIG_FILE, DENOISER_FILE, is_export
from fastross.ross_format import is_reference
from fastross.weights import load_model_weights


def micro_batch(input_ids: list[int], pixel_values: torch.Tensor, image_token_id: int, num_visual: int) -> MicroBatch:
    """One prompt (one `<image>` id, pixel values (1, 3, S, S)) as a packed micro-batch of one sample, for inference."""
    ids = np.asarray(input_ids, np.int64)
    packed = pack_text([TextSample("prompt", ids, np.full(len(ids), IGNORE), True)], image_token_id, num_visual)
    n = len(packed.input_ids)
    one = torch.ones(1)
    return MicroBatch(
        input_ids=torch.from_numpy(packed.input_ids)[None],
        position_ids=torch.from_numpy(packed.position_ids)[None],
        cu_seqlens=torch.from_numpy(packed.cu_seqlens),
        doc_ids=torch.zeros(n, dtype=torch.long),
        max_seqlen=n,
        text_pos=torch.from_numpy(packed.text_pos),
        text_targets=torch.from_numpy(packed.text_targets),
        visual_pos=torch.from_numpy(packed.visual_pos),
        pixel_values=pixel_values,
        image_weight=one,
        t=torch.zeros(1, 1, dtype=torch.long),
        noise_keys=torch.zeros(1, dtype=torch.long),
        latent_mean=None,
        latent_std=None,
        num_images=1,
        num_text_tokens=0,
    )


@torch.no_grad()
def greedy(
    model,
    input_ids: list[int],
    pixel_values: torch.Tensor,
    image_token_id: int,
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> list[int]:
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


@dataclass
class Sampling:
    """How the next token is chosen."""

    max_new_tokens: int = 64  # new tokens at most (the eos token included when reached)
    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus: sample among the most likely tokens whose probabilities sum to >= top_p
    seed: int = 0  # each sample's generator is seeded with it

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling: need max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1, got {self}")


@dataclass
class Prompt:
    input_ids: list[int]  # the prompt's tokens, with one `<image>` id where the image goes, or none
    pixel_values: torch.Tensor | None  # (3, S, S) as the vision tower sees it, or None for a text-only prompt


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (B, V) with every token outside the smallest set of mass >= top_p set to 0 (the most likely is kept)."""
    if top_p >= 1:
        return probs
    sorted_p, order = probs.sort(-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens more likely than this one
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


@contextlib.contextmanager
def hf_sdpa(llm):
    """The LLM with Hugging Face's own sdpa attention (padding masks, a KV cache) instead of fastross's packed one."""
    old = llm.config._attn_implementation
    llm.config._attn_implementation = "sdpa"
    try:
        yield llm
    finally:
        llm.config._attn_implementation = old


@torch.no_grad()
def decode(
    model,
    prompts: list[Prompt],
    image_token_id: int,
    sampling: Sampling,
    eos_token_id: int | None,
    pad_token_id: int = 0,
) -> list[list[int]]:
    """The new token ids of each prompt (eos included when reached), all prompts as one left-padded batch."""
    from transformers import DynamicCache  # transformers (seconds) only once decoding starts

    model.eval()
    llm, device = model.llm, model.projector[0].weight.device
    n_vis = model.num_visual_tokens
    rows = []
    for p in prompts:
        ids = []
        for t in p.input_ids:
            ids += [t] * n_vis if t == image_token_id else [t]
        if (p.pixel_values is not None) != (image_token_id in p.input_ids) or p.input_ids.count(image_token_id) > 1:
            raise ValueError("a prompt needs exactly one <image> token when it has pixel values, and none without")
        rows.append(ids)
    width = max(map(len, rows))
    ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    embeds = llm.get_input_embeddings()(ids)
    pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
    if pixels:
        feats = model.vision(torch.stack(pixels).to(device))
        vis = model.projector(feats.to(model.projector[0].weight.dtype)).to(embeds.dtype)
        where = (ids == image_token_id) & mask.bool()
        embeds = embeds.masked_scatter(where[..., None], vis.flatten(0, 1))  # row-major: each sample's own image
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    gens = None
    if sampling.temperature > 0:
        gens = [torch.Generator(device).manual_seed(sampling.seed) for _ in prompts]
    head = llm.get_output_embeddings()
    cache = DynamicCache()
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with hf_sdpa(llm):
        for _ in range(sampling.max_new_tokens):
            h = llm.model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            ).last_hidden_state[:, -1]
            logits = head(h).float()
            if gens is None:
                nxt = logits.argmax(-1)
            else:
                probs = top_p_filter(torch.softmax(logits / sampling.temperature, -1), sampling.top_p)
                nxt = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])
            for i, t in enumerate(nxt.tolist()):  # host sync: one per new token
                if not done[i]:
                    out[i].append(t)
                    done[i] = t == eos_token_id
            if all(done):
                break
            embeds = llm.get_input_embeddings()(nxt[:, None])
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], 1)
            positions = positions[:, -1:] + 1
    return out


# --- a model from a run folder, a checkpoint or an export -----------------------------------------------------------


@dataclass
class Loaded:
    model: object  # fastross.model.ross.RossModel, eval mode, with the source's weights
    tokenizer: object
    template: str  # the prompt template the training data was converted with
    aspect: str  # image aspect of the training data: "pad" or "square"
    spec: object  # fastross.data.images.ImageSpec of the vision tower
    image_token_id: int
    source: Path  # the checkpoint or export the weights came from


def load(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """A fastross run folder, checkpoint or export folder -> the model and what its prompts and images need."""
    path = Path(path)
    ckpt = resolve(path)
    if ckpt is not None:
        cfg_file = ckpt / "config.yaml"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} is missing: the checkpoint was not written by fastross's trainer")
        cfg = fconfig.load(str(cfg_file), check_paths=False)
        meta = ShardMeta.read(meta_folder(cfg.data))
        template, aspect = meta.template, meta.image_aspect
        tok = templates.load_tokenizer(cfg.model.llm_path)
    elif is_export(path):
        cfg = fconfig.load(str(path / CONFIG_FILE), check_paths=False)
        with safe_open(str(path / DENOISER_FILE), "pt") as f:
            template = f.metadata()["template"]
        aspect = "pad" if json.loads((path / "preprocessor_config.json").read_text()).get("do_pad") else "square"
        tok = templates.load_tokenizer(str(path))
    else:
        hint = (
            f"; it is a reference ROSS checkpoint: import it once with `python -m fastross.convert_checkpoint "
            f"{path} --out RUN` and use RUN"
            if path.is_dir() and is_reference(path)
            else ""
        )
        raise FileNotFoundError(
            f"--model {path}: no fastross checkpoint (checkpoints/latest or .metadata) and no "
            f"fastross export (fastross_config.yaml + denoiser.safetensors){hint}"
        )
    for key, folder in (("model.vision_path", cfg.model.vision_path), ("model.llm_path", cfg.model.llm_path)):
        if not Path(folder).is_dir():
            raise FileNotFoundError(
                f"{key}: {folder} (from {path}'s config) is not a folder; the model is built "
                "from it before the weights are loaded"
            )
    model = build.host(cfg.model, "sdpa", torch.device(device).type, seed=cfg.train.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "assuming the intent is to load in a single process": it is
        source = load_model_weights(path, model)
    return Loaded(
        model.to(device).eval(),
        tok,
        template,
        aspect,
        ImageSpec.from_pretrained(cfg.model.vision_path),
        tok.convert_tokens_to_ids(templates.IMAGE_TOKEN),
        source,
    )


def prompt_ids(loaded: Loaded, question: str, image: bool, history: list[tuple[str, str]] | tuple = ()) -> list[int]:
    """The training sample's tokens before its answer, for one user turn (the `<image>` placed as training places it).

    history: the conversation's earlier (question, answer) turns, rendered before this one as a multi-turn training
    sample holds them; the `<image>` stays where the conversation has it, else goes before the first question. The
    plain template renders one exchange only: there the history is dropped."""
    turns = [*(history if templates.canonical(loaded.template) != "plain" else ()), (question, "A")]
    conv = [{"from": who, "value": v} for q, a in turns for who, v in (("human", q), ("gpt", a))]
    if image and not any(templates.IMAGE_TOKEN in t["value"] for t in conv):
        conv[0]["value"] = f"{templates.IMAGE_TOKEN}\n{conv[0]['value']}"
    rendered = templates.render(loaded.template, conv, image, loaded.tokenizer)
    ids, offsets = templates.encode(rendered, loaded.tokenizer)
    start, end = rendered.spans[-1]  # the last answer's characters: the prompt is every token before its first
    inside = (offsets[:, 0] < end) & (offsets[:, 1] > start) & (ids != loaded.image_token_id)
    return ids[: int(np.flatnonzero(inside)[0])].tolist()


def pixel_values(loaded: Loaded, image: str | Path) -> torch.Tensor:
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    return preprocess(path.read_bytes(), loaded.spec, loaded.aspect)


def answer(loaded: Loaded, items: list[tuple], sampling: Sampling) -> list[str]:
    """(question, image path or None[, history]) -> the decoded answers, one batch, special tokens dropped; history
    as prompt_ids takes it."""
    prompts = [
        Prompt(prompt_ids(loaded, q, img is not None, *h), None if img is None else pixel_values(loaded, img))
        for q, img, *h in items
    ]
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = decode(loaded.model, prompts, loaded.image_token_id, sampling, tok.eos_token_id, pad)
    return [tok.decode(x, skip_special_tokens=True).strip() for x in ids]


def read_batch(path: str | Path) -> list[dict]:
    """A JSONL file of {"prompt": TEXT, "image": PATH (optional, relative to the file), "id": ... (optional)}."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{n}: each line must be an object with a string 'prompt'")
        if row.get("image"):
            row["image"] = str(path.parent / row["image"])
        row.setdefault("id", n)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastross.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="run folder, checkpoint or fastross.export folder")
    p.add_argument("--image", help="image file for --prompt")
    p.add_argument("--prompt", help="the question")
    p.add_argument("--batch", help="JSONL of {prompt, image?, id?} lines, answered in batches")
    p.add_argument("--out", help="write --batch's answers here as JSONL (default: stdout)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if (a.prompt is None) == (a.batch is None):
        p.error("give --prompt (with --image) or --batch")
    sampling = Sampling(a.max_new_tokens, a.temperature, a.top_p, a.seed)
    loaded = load(a.model, a.device)
    if a.prompt is not None:
        print(answer(loaded, [(a.prompt, a.image)], sampling)[0])
        return 0
    rows = read_batch(a.batch)
    with open(a.out, "w") if a.out else contextlib.nullcontext(sys.stdout) as f:
        for i in range(0, len(rows), a.batch_size):
            chunk = rows[i : i + a.batch_size]
            for row, text in zip(chunk, answer(loaded, [(r["prompt"], r.get("image")) for r in chunk], sampling)):
                f.write(json.dumps({"id": row["id"], "prompt": row["prompt"], "answer": text}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""An export loaded by another transformers, in a fresh process, against fastross's own numbers.

    python benchmarks/export_check.py [--python PY] [--device cpu|cuda] [--work DIR] [--save]
    python benchmarks/export_check.py --load EXPORT REF.npz [--device cpu|cuda]    # the loader alone

Makes a tiny fastross run exactly as the tests do (devtools.golden.prepare: the tiny models, the generator's
data converted with qwen2_ross and VAE latents; then one real training step on 1 CPU rank under torchrun, Triton's
interpreter, on a GPU machine too; checkpointed, as tests/conftest.py's `run_dir`), exports it with
`python -m fastross.export`, and computes fastross's reference numbers for 2 images (53 x 37 random pixels, where
the padding matters, and 64 x 64): the prompt's ids as training encodes them (the chat template's prompt, `<image>`
expanded), fastross's pixel values (fastross.data.images.preprocess, the shards' aspect), the logits of that prompt
(RossModel.hidden_states and lm_head) and 12 greedy answer ids (fastross.generate.greedy). fastross's side always
runs on the CPU in fp32.

Then `PY benchmarks/export_check.py --load EXPORT REF.npz` runs in a fresh process (PY: --python, default this
interpreter; PYTHONPATH dropped, so that it sees PY's own packages: the GPU check puts the carried transformers 4.57
on PYTHONPATH for fastross, the loader sees the image's 5.x), importing only torch, transformers, PIL and numpy
(this file imports fastross inside the functions that need it, and the loader fails if fastross was imported), and
loads the folder as a user would: AutoModelForImageTextToText (it must be LlavaForConditionalGeneration, with no
missing, unexpected or mismatched weight) and AutoProcessor(use_fast=False). It compares: the processor's input ids
with fastross's (equal), the pixel values (equal: the slow processor is exact), the logits (max |diff| <= 1e-4, as
tests/test_export.py), `generate`'s greedy answer (equal), and reports the fast processor's largest difference from
the slow one in 8-bit levels (<= 2; transformers 5.x's default; n/a where transformers, lacking torchvision, falls
back to the PIL one). With --device cuda (the default when a GPU is present) the loaded model runs on the GPU in
fp32 with TF32 off, and its logits are compared on the CPU with fastross's CPU numbers: the bound is the same.

Ends with

    export_check: transformers V logits_max_diff E greedy_equal yes|no pixels_equal yes|no fast_levels L

(V: the loader's transformers) and exits 1 when a bound fails or the folder does not load as it should. --save
appends a row to benchmarks/results/export_check.csv. The work folder is a temporary one unless --work names one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: devtools/ is never installed

QUESTION = "What shape is in the picture?"
CONV = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "A red circle."}]
USER = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
SIZES = ((53, 37), (64, 64))  # (width, height): a non-square image (the padding matters) and a square one
NEW_TOKENS = 12
LOGITS_BOUND = 1e-4  # tests/test_export.py's
FAST_LEVELS_BOUND = 2.0  # 8-bit levels: the fast processor resizes with torchvision, not PIL (tests/test_export.py)
RESULT = "export_check_load: "  # the loader's last line: this prefix and a JSON object
REPO = Path(__file__).resolve().parents[1]


def images() -> list[bytes]:
    """The two images as PNG bytes: random pixels, so that every pixel of the path is seen."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for w, h in SIZES:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# ---------------------------------------------------------------- fastross's side


def train_tiny(work: Path) -> Path:
    """The tests' one-step run (tests/conftest.py `run_dir`): returns the run folder, holding its checkpoint."""
    from devtools.faults import write_config
    from devtools.golden import prepare
    from fastross.demo import torchrun_cmd

    models, shards = prepare(work)
    run = work / "run"
    cfg = write_config(work / "run.yaml", models, shards, run, max_steps=1, ckpt_every=10)
    # On the CPU wherever it runs (a GPU machine too): the step only makes weights that are not an initialisation.
    env = {**os.environ, "TMPDIR": str(work), "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    p = subprocess.run(torchrun_cmd(1, cfg), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if not (run / "checkpoints").is_dir():
        raise RuntimeError(
            f"export_check: the one-step run wrote no checkpoint in {run}:\n{(p.stdout + p.stderr)[-4000:]}"
        )
    return run


def reference(run: Path, export: Path) -> dict[str, np.ndarray]:
    """fastross's numbers per image, on the CPU in fp32: prompt ids (expanded), pixel values, logits, greedy ids."""
    import torch

    from fastross.build import checkpoint_model
    from fastross.data import templates
    from fastross.data.images import ImageSpec, preprocess
    from fastross.data.schema import ShardMeta
    from fastross.data.sources import meta_folder
    from fastross.generate import greedy, micro_batch

    model, cfg = checkpoint_model(run)
    meta = ShardMeta.read(meta_folder(cfg.data))
    tok = templates.load_tokenizer(cfg.model.llm_path)
    spec = ImageSpec.from_pretrained(cfg.model.vision_path)
    ids, labels = templates.tokenize(templates.render(meta.template, CONV, True, tok), tok)
    prompt = ids[: int(np.flatnonzero(labels != templates.IGNORE)[0])].tolist()  # the tokens before the answer
    ref = {"export": np.array(str(export))}
    for i, data in enumerate(images()):
        pixels = preprocess(data, spec, meta.image_aspect)[None]
        mb = micro_batch(prompt, pixels, meta.image_token_id, model.num_visual_tokens)
        with torch.no_grad():
            logits = model.llm.get_output_embeddings()(model.hidden_states(mb))
        answer = greedy(model, prompt, pixels, meta.image_token_id, NEW_TOKENS, eos_token_id=tok.eos_token_id)
        ref |= {
            f"image{i}": np.frombuffer(data, np.uint8),
            f"input_ids{i}": mb.input_ids[0].numpy(),
            f"pixels{i}": pixels[0].numpy(),
            f"logits{i}": logits.numpy(),
            f"greedy{i}": np.array(answer),
        }
    return ref


# ---------------------------------------------------------------- the loader: torch, transformers, PIL, numpy only


def load(export: Path, ref_path: Path, device: str) -> dict:
    """Load the export as a user would and compare with the reference; returns the figures (no fastross import)."""
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on a GPU too: the 1e-4 bound is fp32's
    torch.backends.cudnn.allow_tf32 = False
    ref = np.load(ref_path)
    model, info = AutoModelForImageTextToText.from_pretrained(export, output_loading_info=True)
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if type(model).__name__ != "LlavaForConditionalGeneration" or problems:
        raise RuntimeError(
            f"{export}: loaded as {type(model).__name__} with {problems or 'every weight in place'}; "
            "want LlavaForConditionalGeneration with no missing, unexpected or mismatched weight"
        )
    model = model.to(device=device, dtype=torch.float32).eval()
    slow = AutoProcessor.from_pretrained(export, use_fast=False)
    fast = AutoProcessor.from_pretrained(export, use_fast=True).image_processor
    fast_name = type(fast).__name__
    if type(fast) is type(slow.image_processor):  # without torchvision transformers falls back to the PIL one
        fast, fast_name = None, "no fast processor (torchvision absent)"
    text = slow.apply_chat_template(USER, add_generation_prompt=True)
    out = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": device,
        "slow_processor": type(slow.image_processor).__name__,
        "fast_processor": fast_name,
        "ids_equal": True,
        "pixels_equal": True,
        "logits_max_diff": 0.0,
        "logits_scale": 0.0,
        "greedy_equal": True,
        "greedy_tokens": 0,
        "fast_levels": 0.0 if fast is not None else None,
    }
    for i in range(len(SIZES)):
        img = Image.open(io.BytesIO(ref[f"image{i}"].tobytes()))
        hf = slow(text=text, images=img, return_tensors="pt")
        out["ids_equal"] &= hf.input_ids[0].tolist() == ref[f"input_ids{i}"].tolist()
        out["pixels_equal"] &= torch.equal(hf.pixel_values[0], torch.from_numpy(ref[f"pixels{i}"]))
        if fast is not None:
            std = torch.tensor(slow.image_processor.image_std).view(1, 3, 1, 1)
            diff = (fast(img, return_tensors="pt").pixel_values - hf.pixel_values).abs() * std * 255
            out["fast_levels"] = max(out["fast_levels"], diff.max().item())
        hf = hf.to(device)
        with torch.no_grad():
            logits = model(**hf).logits[0].float().cpu()
            answer = model.generate(**hf, max_new_tokens=NEW_TOKENS, do_sample=False)[0, hf.input_ids.shape[1] :]
        want = torch.from_numpy(ref[f"logits{i}"])
        if logits.shape != want.shape:
            raise RuntimeError(
                f"{export}: logits of shape {tuple(logits.shape)} for image {i}, fastross's are "
                f"{tuple(want.shape)}: the prompts differ (ids equal: {out['ids_equal']})"
            )
        out["logits_max_diff"] = max(out["logits_max_diff"], (logits - want).abs().max().item())
        out["logits_scale"] = max(out["logits_scale"], want.abs().max().item())
        out["greedy_equal"] &= answer.tolist() == ref[f"greedy{i}"].tolist()
        out["greedy_tokens"] += len(ref[f"greedy{i}"])
    if any(m == "fastross" or m.startswith("fastross.") for m in sys.modules):
        raise RuntimeError("export_check: the loader imported fastross: it must see the export as a user does")
    return out


def run_loader(python: str, export: Path, ref_path: Path, device: str) -> dict:
    """The loader in a fresh process of `python`; its figures, or an error with its output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of this checkout on its path
    cmd = [python, str(Path(__file__).resolve()), "--load", str(export), str(ref_path), "--device", device]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tempfile.gettempdir())
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT)]
    if p.returncode != 0 or not lines:
        raise RuntimeError(
            f"export_check: the loader ({' '.join(cmd)}) failed with exit {p.returncode}:\n"
            f"{(p.stdout + p.stderr)[-4000:]}"
        )
    return json.loads(lines[-1][len(RESULT) :])


def yes(b: bool) -> str:
    return "yes" if b else "no"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", nargs=2, metavar=("EXPORT", "REF_NPZ"), help="run the loader alone (the fresh process)")
    p.add_argument("--python", default=sys.executable, help="the interpreter the loader runs in (its transformers)")
    p.add_argument("--device", default=None, help="the loaded model's device (default: cuda when present, else cpu)")
    p.add_argument("--work", help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--save", action="store_true", help="append a row to benchmarks/results/export_check.csv")
    a = p.parse_args(argv)
    if a.load:
        import torch

        got = load(Path(a.load[0]), Path(a.load[1]), a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        print(RESULT + json.dumps(got))
        return 0

    from devtools import results as R
    from fastross.export import main as export_main

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastross-export-check-") as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        run = train_tiny(work)
        t_train = time.perf_counter() - t0
        export = work / "export"
        if export_main([str(run), "--out", str(export)]) != 0:
            return 1
        np.savez(work / "ref.npz", **reference(run, export))
        device = (
            a.device
            or subprocess.run(
                [a.python, "-c", "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        got = run_loader(a.python, export, work / "ref.npz", device)
    wall = time.perf_counter() - t0
    fast = got["fast_levels"]
    ok = {
        "input ids equal fastross's": got["ids_equal"],
        "pixel values equal": got["pixels_equal"],
        f"logits max |diff| <= {LOGITS_BOUND:g}": got["logits_max_diff"] <= LOGITS_BOUND,
        "greedy answers equal": got["greedy_equal"],
        f"fast processor within {FAST_LEVELS_BOUND:g} levels": fast is None or fast <= FAST_LEVELS_BOUND,
    }
    print(
        f"  loader {a.python}: transformers {got['transformers']}, torch {got['torch']}, device {got['device']}; "
        f"processors {got['slow_processor']} (use_fast=False), {got['fast_processor']} (use_fast=True)"
    )
    print(
        f"  logits max |diff| {got['logits_max_diff']:.2e} at scale {got['logits_scale']:.2f}; greedy "
        f"{got['greedy_tokens']} tokens over {len(SIZES)} images; wall {wall:.0f} s ({t_train:.0f} s making the run)"
    )
    for what, good in ok.items():
        if not good:
            print(f"export_check: FAILED: {what}")
    levels = "n/a" if fast is None else f"{fast:.2f}"
    print(
        f"export_check: transformers {got['transformers']} logits_max_diff {got['logits_max_diff']:.2e} "
        f"greedy_equal {yes(got['greedy_equal'])} pixels_equal {yes(got['pixels_equal'])} fast_levels {levels}"
    )
    if a.save:
        out = R.append_csv(
            "export_check.csv",
            [
                "date",
                "commit",
                "machine",
                "device",
                "transformers",
                "torch",
                "logits_max_diff",
                "logits_scale",
                "greedy_equal",
                "greedy_tokens",
                "pixels_equal",
                "ids_equal",
                "fast_levels",
                "wall_s",
            ],
            [
                [
                    R.today(),
                    R.commit(),
                    R.machine(),
                    got["device"],
                    got["transformers"],
                    got["torch"],
                    f"{got['logits_max_diff']:.3e}",
                    f"{got['logits_scale']:.3f}",
                    yes(got["greedy_equal"]),
                    got["greedy_tokens"],
                    yes(got["pixels_equal"]),
                    yes(got["ids_equal"]),
                    levels,
                    f"{wall:.0f}",
                ]
            ],
        )
        print(f"export_check: appended to {out}")
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""FLOPs of a training step: counted from the model, and the analytic formula the run uses; device peaks and MFU.

Two numbers, as PaLM and torchtitan define them:
- model FLOPs: what the step needs mathematically (forward, and backward where a gradient is needed), no
  recomputation of any kind; MFU divides these by the time and the device's peak;
- hardware FLOPs: what actually runs, adding the activation-checkpointing recompute (`full`: a decoder
  layer's forward again, without its last matmul, down_proj, which non-reentrant checkpointing never needs;
  `selective`: no matmul, its outputs are kept) and the attention kernels' own recompute of the scores in
  backward (torch's flop counter charges SDPA's backward 2.5x its forward; model FLOPs charge 2x).
  R = hardware / model.

Attention is counted over each sample's own length and as a full square (not halved for causality), as
torch's counter and PaLM's 12 * layers * heads * head_dim * context per token do.

`count_sample` counts one sample's forward and backward with torch.utils.flop_counter.FlopCounterMode on the
real RossModel under FakeTensorMode (no memory, seconds at 7B shapes). FlopCounterMode's per-module split is
wrong with FSDP and backward (CPU_AND_GPU.md), so each part runs in its own counter window, fed detached
inputs that need a gradient exactly where the real step's do: vision (no grad), projector, LLM body
(linears and attention split by op), lm_head over the supervised tokens (plain CE: the fused kernel does
the same matmuls in chunks), denoiser. `step_flops` is the analytic formula; tests/test_flops.py holds it
within 2% of the counter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch

PARTS = ("vision", "projector", "llm_linear", "attention", "lm_head", "denoiser")

# Dense bf16 peak TFLOP/s, matched by substring of the device name, first match wins (PCIe before SXM).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("B200", 2250.0),
)


def table_peak_tflops(device_name: str) -> float | None:
    """The table's dense bf16 peak for a device name (e.g. 'NVIDIA H100 80GB HBM3' -> 989), None if unknown."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def measured_cpu_peak(n: int = 512, window_s: float = 0.3, repeats: int = 5) -> float:
    """The fp32 matmul rate this CPU reaches now (TFLOP/s): the best n^3 torch.mm over at least `repeats` runs and
    `window_s` seconds, so that a machine busy for a moment still shows its peak. The CPU's 'peak', so MFU is a
    number; benchmarks/kernels/_harness.py uses it on CPU too."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best, start, runs = float("inf"), time.perf_counter(), 0
    while runs < repeats or time.perf_counter() - start < window_s:
        t0 = time.perf_counter()
        a @ b
        best, runs = min(best, time.perf_counter() - t0), runs + 1
    return 2 * n**3 / best / 1e12


def peak_tflops(configured: float, device: torch.device) -> tuple[float, str]:
    """(peak TFLOP/s, where it came from): train.peak_tflops when > 0, else the table for a GPU, else measured."""
    if configured > 0:
        return configured, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = table_peak_tflops(name)
        if tflops is None:
            known = ", ".join(k for k, _ in PEAK_TFLOPS)
            raise ValueError(f"no dense bf16 peak known for {name!r} (table: {known}); set train.peak_tflops")
        return tflops, f"table ({name})"
    return measured_cpu_peak(), "measured CPU matmul"


def mfu(model_flops: float, seconds: float, devices: int, peak: float) -> float:
    """Model FLOPs utilisation: model_flops done by `devices` devices in `seconds`, over their peak (TFLOP/s)."""
    return model_flops / (seconds * devices * peak * 1e12)


@dataclass(frozen=True)
class Arch:
    """The architecture numbers the formula needs, read from a (meta- or fake-built) RossModel."""

    vision_layers: int  # encoder layers kept (select_layer applied)
    vision_width: int
    vision_mlp: int
    patch_in: int  # 3 * patch * patch: the patch embedding's input per token
    visual_tokens: int  # N per image
    hidden: int  # LLM width H
    llm_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    den_kind: str
    den_width: int
    den_depth: int
    den_replicas: int
    den_channels: int  # 4 * latent channels
    den_freq: int  # timestep features
    vision_class_tokens: int = 0  # tokens the tower runs beside its patches (CLIP's class token; SigLIP none)

    @classmethod
    def of(cls, model) -> Arch:
        v, c, d = model.vision, model.llm.config, model.denoiser
        layer = v.encoder.layers[0]
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(
            vision_layers=len(v.encoder.layers),
            vision_width=v.hidden_size,
            vision_mlp=layer.mlp.fc1.out_features,
            patch_in=3 * v.patch_size**2,
            visual_tokens=v.num_tokens,
            hidden=c.hidden_size,
            llm_layers=c.num_hidden_layers,
            heads=c.num_attention_heads,
            kv_heads=c.num_key_value_heads,
            head_dim=head_dim,
            intermediate=c.intermediate_size,
            vocab=c.vocab_size,
            den_kind=d.kind,
            den_width=d.x_embed.out_features,
            den_depth=len(d.blocks),
            den_replicas=model.replicas,
            den_channels=d.x_embed.in_features,
            den_freq=d.t_embed.freq_dim,
            vision_class_tokens=v.kind.class_tokens,
        )

    @property
    def layer_linear(self) -> int:
        """Multiply-accumulates per token of one decoder layer's linears (q, k, v, o, gate, up, down)."""
        q = self.heads * self.head_dim
        return (
            2 * self.hidden * q + 2 * self.hidden * self.kv_heads * self.head_dim + 3 * self.hidden * self.intermediate
        )


@dataclass(frozen=True)
class StepFlops:
    """FLOPs by part (PARTS): model (no recompute) and hardware (with it)."""

    model: dict[str, float]
    hardware: dict[str, float]

    @property
    def model_total(self) -> float:
        return sum(self.model.values())

    @property
    def hardware_total(self) -> float:
        return sum(self.hardware.values())

    @property
    def recompute(self) -> float:
        """R: hardware over model FLOPs."""
        return self.hardware_total / self.model_total


def step_flops(
    arch: Arch,
    lengths,
    images,
    supervised,
    trainable=("projector", "llm", "denoiser"),
    policies: list[str] | None = None,
) -> StepFlops:
    """The analytic FLOPs of samples with `lengths` (visual tokens included), `images` (bool each) and
    `supervised` tokens each; `policies`: one checkpointing policy per decoder layer (None: none)."""
    lengths = [int(x) for x in lengths]
    return totals_flops(
        arch,
        sum(lengths),
        sum(x * x for x in lengths),
        int(sum(bool(x) for x in images)),
        int(sum(supervised)),
        trainable,
        policies,
    )


def totals_flops(
    arch: Arch,
    tokens: int,
    tokens_sq: int,
    n_img: int,
    n_supervised: int,
    trainable=("projector", "llm", "denoiser"),
    policies: list[str] | None = None,
) -> StepFlops:
    """step_flops from the totals it depends on (it is linear in each): the samples' tokens, the sum of their
    squared lengths, their images and supervised tokens. The trainer sums these over the steps between records."""
    a = arch
    proj_t, llm_t, den_t = ("projector" in trainable), ("llm" in trainable), ("denoiser" in trainable)
    g_llm = llm_t or proj_t  # a gradient flows into the LLM's input (and so into the denoiser's condition)
    den_bwd = den_t or g_llm
    policies = policies or ["none"] * a.llm_layers
    n_full = sum(p == "full" for p in policies)
    sq = tokens_sq
    N, W, H = a.visual_tokens, a.den_width, a.hidden
    q_width = a.heads * a.head_dim

    m, hw = {}, {}
    vw = a.vision_width
    S = N + a.vision_class_tokens  # the tower's sequence: the patches (embedded by the convolution) and CLIP's CLS
    per_image = 2 * N * a.patch_in * vw + a.vision_layers * (
        2 * S * (4 * vw * vw + 2 * vw * a.vision_mlp) + 4 * S * S * vw
    )
    m["vision"] = n_img * per_image  # frozen: forward only
    m["projector"] = n_img * 2 * N * (vw * H * (1 + proj_t) + H * H * (1 + 2 * proj_t))
    m["llm_linear"] = 2 * tokens * a.llm_layers * a.layer_linear * (1 + llm_t + g_llm)
    attn_fwd = a.llm_layers * 4 * sq * q_width
    m["attention"] = attn_fwd * (1 + 2 * g_llm)
    m["lm_head"] = 2 * n_supervised * H * a.vocab * (1 + llm_t + g_llm)
    rows = n_img * a.den_replicas * N  # replica tokens
    if a.den_kind == "dit":
        block_macs, den_attn_fwd = 18 * W * W, a.den_depth * 4 * n_img * a.den_replicas * N * N * W
    else:
        block_macs, den_attn_fwd = 5 * W * W, 0
    den = 2 * rows * a.den_channels * W * (1 + den_t)  # x_embed: x_t needs no gradient
    den += 2 * n_img * N * H * W * (1 + den_t + g_llm)  # c_embed, once per image token
    den += 2 * n_img * a.den_replicas * (a.den_freq * W * (1 + den_t) + W * W * (1 + 2 * den_t))  # t_embed
    den += 2 * rows * (a.den_depth * block_macs + 2 * W * W + W * a.den_channels) * (1 + den_t + den_bwd)
    m["denoiser"] = den + den_attn_fwd * (1 + 2 * den_bwd)

    hw = dict(m)
    # the attention kernels recompute the scores in backward: +0.5 forward (torch's counter)
    hw["attention"] += 0.5 * attn_fwd * g_llm
    hw["denoiser"] += 0.5 * den_attn_fwd * den_bwd
    if g_llm:  # full checkpointing re-runs each such layer's forward, down_proj aside
        per_layer_lin = 2 * tokens * (a.layer_linear - H * a.intermediate)
        hw["llm_linear"] += n_full * per_layer_lin
        hw["attention"] += n_full * attn_fwd / a.llm_layers
    return StepFlops({k: float(v) for k, v in m.items()}, {k: float(v) for k, v in hw.items()})


# --- the counter -------------------------------------------------------------------------------------------


def _register_formulas() -> None:
    """Flop formulas for SDPA's CPU kernel (the vision tower and the denoiser under the fake mode), which
    torch's counter lacks; importing torch.nn.attention.varlen registers its op's formula (the LLM)."""
    import torch.nn.attention.varlen  # noqa: F401  (defines torch.ops.torch_attn and its flop formulas)
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


ATTENTION_OPS = ("_varlen_attn", "_varlen_attn_backward")


class FakeModel:
    """A RossModel built on the meta device and materialised as fake tensors: shapes only, no memory.

    model_cfg: fastross.config.ModelConfig whose folders hold config.json (fastross.model.presets.arch_folders);
    the LLM uses the `varlen` attention backend (its op has a fake implementation); `policy` is
    train.activation_checkpointing, applied as the trainer does (fastross.distributed); device: the type of device
    counted for, what model.denoiser.impl=auto resolves to (the default, cpu, gives the PyTorch ops, which the counter
    sees; the Triton kernels are custom ops it does not). Built as the trainer builds it (fastross.build), short of
    FSDP: fake tensors in place of its weights."""

    def __init__(
        self, model_cfg, trainable=("projector", "llm", "denoiser"), policy: str | list = "none", device: str = "cpu"
    ):
        # The model (and the Triton kernels under it) only for the counter: fastross.metrics and the kernel
        # benchmarks import this module for its formula and device peaks alone.
        from fastross import build
        from fastross.distributed import apply_activation_checkpointing

        _register_formulas()
        cfg = dataclasses.replace(model_cfg, fused_ce=False, liger_kernels=False)
        self.model = build.meta(cfg, "varlen", device)
        build.freeze(self.model, trainable)
        self.trainable = tuple(trainable)
        self.policies = apply_activation_checkpointing(self.model.llm.model.layers, policy)
        self.mode = build.fake(self.model)
        self.arch = Arch.of(self.model)


def count_sample(fake: FakeModel, length: int, image: bool, supervised: int) -> dict[str, float]:
    """Hardware FLOPs by part (PARTS) of one sample's forward and backward, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    m, a = fake.model, fake.arch
    trainable = fake.trainable
    g_llm = "llm" in trainable or "projector" in trainable
    N, H = a.visual_tokens, a.hidden
    out = dict.fromkeys(PARTS, 0.0)

    @contextlib.contextmanager
    def window(part):
        with FlopCounterMode(display=False) as c:
            yield
        counts = c.get_flop_counts()["Global"]
        if part == "llm":
            attn = sum(v for op, v in counts.items() if str(op).split(".")[-1] in ATTENTION_OPS)
            out["attention"] += attn
            out["llm_linear"] += c.get_total_flops() - attn
        else:
            out[part] += c.get_total_flops()

    with fake.mode:
        if image:
            size = m.vision.image_size
            with window("vision"), torch.no_grad():
                feats = m.vision(torch.zeros(1, 3, size, size))
            with window("projector"):
                vis = m.projector(feats.detach())
                if "projector" in trainable:
                    vis.sum().backward()
        x = torch.zeros(1, length, H, requires_grad=g_llm)
        cu = torch.tensor([0, length], dtype=torch.int32)
        with window("llm"):
            h = m.llm.model(
                inputs_embeds=x,
                position_ids=torch.arange(length)[None],
                attention_mask=None,
                use_cache=False,
                fastross_cu_seqlens=cu,
                fastross_max_seqlen=length,
                fastross_mask=None,
            ).last_hidden_state
            if g_llm:
                h.sum().backward()
        with window("lm_head"):
            head = m.llm.get_output_embeddings()
            ht = torch.zeros(supervised, H, requires_grad=g_llm)
            loss = m.text_loss(ht, head.weight, head.bias, torch.zeros(supervised, dtype=torch.long))
            if loss.requires_grad:
                loss.backward()
        if image:
            with window("denoiser"):
                cond = torch.zeros(1, N, H, requires_grad=g_llm)
                x_t = torch.zeros(1, a.den_replicas, N, a.den_channels)
                t = torch.zeros(1, a.den_replicas, dtype=torch.long)
                eps = m.denoiser(x_t, t, cond)
                if eps.requires_grad:
                    eps.float().pow(2).sum().backward()
    return out


def count(fake: FakeModel, lengths, images, supervised) -> dict[str, float]:
    """count_sample summed over samples (each its own micro-batch, as the counter needs)."""
    total = dict.fromkeys(PARTS, 0.0)
    for n, img, k in zip(lengths, images, supervised):
        for part, v in count_sample(fake, int(n), bool(img), int(k)).items():
            total[part] += v
    return total

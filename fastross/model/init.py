"""Fresh parameters (the projector's and the denoiser's): one keyed generator per tensor.

Each fresh tensor is drawn whole, in fp32 on the host, from its own generator seeded by
(train.seed, the parameter's name in RossModel), and each rank keeps only the slice it holds.
So the eager build and the meta-device build (fastross.model.load) give identical values on
any number of ranks, and no rank ever holds more than one whole fresh tensor beyond its shards.
The trade-off: every rank draws every fresh tensor in full (the largest, the projector's
H x H at the 7B shapes, is 51 MB), which is small next to reading the LLM.

A rule is a function (shape, generator) -> fp32 tensor; modules declare theirs in an
`init_rules()` method keyed by parameter name, so the distributions are written once.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import nn

Rule = Callable[[tuple, "torch.Generator | None"], torch.Tensor]


def zeros(shape: tuple, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.zeros(shape)


def normal(std: float) -> Rule:
    def rule(shape: tuple, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.empty(shape).normal_(0.0, std, generator=generator)

    return rule


def uniform(bound: float) -> Rule:
    def rule(shape: tuple, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)

    return rule


def xavier_uniform(shape: tuple, generator: torch.Generator | None = None) -> torch.Tensor:
    """nn.init.xavier_uniform_ for a Linear weight (out, in): U(-a, a), a = sqrt(6 / (in + out))."""
    fan_out, fan_in = shape
    return uniform(math.sqrt(6.0 / (fan_in + fan_out)))(shape, generator)


def linear_default(layer: nn.Linear) -> dict[str, Rule]:
    """nn.Linear's own init: kaiming_uniform_(a=sqrt(5)) on the weight and the bias's U(-1/sqrt(in), 1/sqrt(in))
    are both U(-1/sqrt(in), 1/sqrt(in))."""
    rule = uniform(1.0 / math.sqrt(layer.in_features))
    return {"weight": rule} | ({"bias": rule} if layer.bias is not None else {})


def keyed_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by (seed, name): stable across processes, Python versions and rank counts."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def fresh(rule: Rule, shape: tuple, seed: int, name: str) -> torch.Tensor:
    """The whole fresh tensor for parameter `name` (fp32, host)."""
    return rule(tuple(shape), keyed_generator(seed, name))


def prefixed(prefix: str, rules: dict[str, Rule]) -> dict[str, Rule]:
    return {f"{prefix}{name}": rule for name, rule in rules.items()}


@torch.no_grad()
def apply_rules(module: nn.Module, rules: dict[str, Rule], seed: int | None, prefix: str = "") -> None:
    """Initialise `module`'s parameters in place (whole tensors, no sharding); seed None draws from torch's global RNG.

    prefix is the module's name inside the model, so that keyed draws match the meta-device path.
    """
    params = dict(module.named_parameters())
    if set(params) != set(rules):
        raise ValueError(
            f"init rules do not match {type(module).__name__}'s parameters: {sorted(set(params) ^ set(rules))}"
        )
    for name, p in params.items():
        rule = rules[name]
        value = rule(tuple(p.shape), None) if seed is None else fresh(rule, p.shape, seed, prefix + name)
        p.copy_(value)

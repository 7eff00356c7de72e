"""The mlp2x_gelu projector: Linear(vision width -> H), GELU, Linear(H -> H)."""

from torch import nn

from fastross.model import init


class Projector(nn.Sequential):
    def __init__(self, vision_width: int, hidden: int):
        super().__init__(nn.Linear(vision_width, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def init_rules(self) -> dict[str, init.Rule]:
        """nn.Linear's default init for both layers (the reference's)."""
        return init.prefixed("0.", init.linear_default(self[0])) | init.prefixed("2.", init.linear_default(self[2]))

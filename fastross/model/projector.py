"""The mlp2x_gelu projector: Linear(vision width -> H), GELU, Linear(H -> H)."""

from torch import nn


class Projector(nn.Sequential):
    def __init__(self, vision_width: int, hidden: int):
        super().__init__(nn.Linear(vision_width, hidden), nn.GELU(), nn.Linear(hidden, hidden))

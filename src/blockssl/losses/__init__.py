"""Self-supervised losses: ``forward(z1, z2) -> scalar``, the loss of the global batch in any number of processes."""

from blockssl.losses.barlow_twins import BarlowTwinsLoss
from blockssl.losses.simclr import SimCLRLoss
from blockssl.losses.vicreg import VICRegLoss

__all__ = ["BarlowTwinsLoss", "SimCLRLoss", "VICRegLoss"]

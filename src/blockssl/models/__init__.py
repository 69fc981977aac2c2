"""Backbones, heads and noise. Importing the package registers every backbone family."""

from blockssl.models import backbone, vit

__all__ = ["backbone", "vit"]

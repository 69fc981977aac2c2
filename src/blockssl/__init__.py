"""blockssl: blockwise self-supervised pretraining (Siddiqui, Krueger, LeCun, Deny; TMLR 2024)."""

__version__ = "0.1.0"

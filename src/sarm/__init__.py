"""SARM: a reward model whose score is a linear head over sparse-autoencoder features."""

from sarm.errors import SarmError

__all__ = ["SarmError"]
__version__ = "0.1.0"

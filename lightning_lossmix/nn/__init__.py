"""Layers for loss games.

Examples:
    >>> from lightning_lossmix.nn import GradientReversal
    >>> GradientReversal(0.5)
    GradientReversal(scale=0.5)
"""

from lightning_lossmix.nn._gradient_reversal import GradientReversal

__all__ = ["GradientReversal"]

"""Lightning callbacks that measure the loss terms of a `LossMix` while training.

Examples:
    >>> from lightning_lossmix.callbacks import GradientMonitor
    >>> GradientMonitor(every_n_steps=50, groups={"decoder": ["decoder"]}).groups
    {'decoder': ['decoder']}
"""

from lightning_lossmix.callbacks._gradient_monitor import GradientMonitor

__all__ = ["GradientMonitor"]

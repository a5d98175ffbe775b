"""The public singd package's import path ``singd.optim.optimizer.SINGD``.

Ours is :mod:`singd.optim.singd`; this module only re-exports the class.
"""

from singd.optim.singd import SINGD

__all__ = ["SINGD"]

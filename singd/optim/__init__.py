"""Optimizers: SINGD (IKFAC/INGD modes) and the KFAC baseline."""

from singd.optim.kfac import KFAC
from singd.optim.singd import SINGD

__all__ = ["KFAC", "SINGD"]

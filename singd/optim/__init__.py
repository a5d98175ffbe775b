"""Optimizers: SINGD (IKFAC/INGD modes) and the KFAC baseline."""

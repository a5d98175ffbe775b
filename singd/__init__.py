"""SINGD: structured inverse-free natural gradient descent for PyTorch."""

"""The independent oracle: SPEC.md's maths in float64 numpy or mpmath.

Imports numpy, scipy and mpmath only — never torch, never singd.
"""

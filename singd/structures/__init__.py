"""Structured Kronecker factors (SPEC §2) and the name registry."""

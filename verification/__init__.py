"""Runs scenarios through singd and the reference oracle and reports the comparison."""

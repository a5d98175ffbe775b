"""Small end-to-end experiments on real data (no downloads), runnable as modules."""

"""asv benchmarks for SINGD (run from ``asv_benches/``; see ``asv.conf.json``)."""

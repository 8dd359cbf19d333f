"""Benchmarks: side-by-side memory / parameter-update / time measurements of fine-tuning methods."""

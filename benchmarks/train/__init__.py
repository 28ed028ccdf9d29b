"""Modules of benchmarks/train_large_batch.py: data, models, LARS, the training loop, outputs."""

"""Modules of large_batch_study/train_large_batch.py: data, models, LARS, the training loop, outputs."""

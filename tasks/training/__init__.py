"""Shared training machinery: data order, checkpoints, distributed setup, the training loop."""

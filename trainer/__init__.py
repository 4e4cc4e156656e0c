"""Trainer: datasets, the two-tower model, evaluation and versioned export."""

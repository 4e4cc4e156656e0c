"""Ranking service: the second stage of recsys.

The user tower runs once per request (once per micro-batch of requests);
candidates are scored by a dot product against the item vectors the trainer
precomputed, which stay resident on the GPU or memory-mapped in host memory.
"""

"""Turning logits into tokens: batched sampling on the device."""

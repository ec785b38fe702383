"""Speculative decoding: draft tokens cheaply, verify them all in one forward of the model."""

"""Batched sampling with KV cache, per-sample RNG, end strings and prefix sharing."""

from harness.generation.sampler import generate

__all__ = ["generate"]

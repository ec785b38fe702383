"""Rotary position embedding (the rotate-half form HF uses), with Llama 3 frequency scaling.

cos/sin are tabulated once for every position at load time; a step indexes them by position
once and every layer reuses that slice.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fulmine.config import ConfigError


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    assert scaling is not None
    if rope_type == "freq_factors":  # GGUF Llama 3.x: llama.cpp's precomputed per-frequency divisors
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float64)
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ConfigError(f"rope scaling type {rope_type!r} is not supported (supported: default, linear, llama3)")


class RotaryEmbedding:
    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        # [max_positions, head_dim / 2], the angles in float64, a few thousand positions at a time
        # (whole, Gemma 3's 32k positions x 128 of them twice over made 128 MB of float64 at once)
        self.cos = torch.empty(max_positions, head_dim // 2, dtype=dtype)
        self.sin = torch.empty(max_positions, head_dim // 2, dtype=dtype)
        for start in range(0, max_positions, 4096):
            angles = torch.outer(torch.arange(start, min(start + 4096, max_positions), dtype=torch.float64), inv_freq)
            self.cos[start : start + len(angles)] = angles.cos()
            self.sin[start : start + len(angles)] = angles.sin()
        self.cos, self.sin = self.cos.to(device), self.sin.to(device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the given positions, shaped [num_tokens, 1, head_dim / 2] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

"""Deterministic, well-scaled weights for a state_dict layout: a seeded function of (key, shape).

Used to compare our model with the official implementation without shipping either's trained
weights: the same function fills both models, so equal outputs mean equal computations. Scales
keep activations finite and non-trivial through every stage: weights ~ N(0, 1/fan_in), BN
running variances in [1, 1.5], affine parameters near (1, 0), and a relative position bias large
enough to change the attention. Integer buffers (the relative position index, BN batch counts)
are taken from the template, since they are structure, not weights.
"""

from __future__ import annotations

import math
import zlib

import torch


def reference_value(key: str, like: torch.Tensor) -> torch.Tensor:
    """The value for ``key`` with ``like``'s shape and dtype."""
    if not like.is_floating_point():
        return like.clone()
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    shape = like.shape
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "running_var":
        value = 1.0 + 0.5 * torch.rand(shape, generator=gen)
    elif leaf == "running_mean":
        value = 0.1 * torch.randn(shape, generator=gen)
    elif leaf == "relative_position_bias_table":
        value = 0.5 * torch.randn(shape, generator=gen)
    elif leaf == "bias":
        value = 0.1 * torch.randn(shape, generator=gen)
    elif len(shape) == 1:  # BN / LayerNorm scale
        value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    else:
        fan_in = math.prod(shape[1:])
        value = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return value.to(like.dtype)


def reference_state_dict(template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill every entry of ``template`` (a model's state_dict) with :func:`reference_value`."""
    return {key: reference_value(key, value) for key, value in template.items()}

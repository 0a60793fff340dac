"""``conv3x3(cat(bilinear_upsample(x_i)))`` without upsampling the coarse branches first.

The OCR head (and its auxiliary head) upsample the four HRT branches to stride 4, concatenate
them (480 channels for HRT-S) and run a 3x3 convolution to 512 channels. That convolution is
~70% of the whole model's forward FLOPs, and most of it is spent on the coarse branches, whose
upsampled maps are smooth and 16x / 64x larger than the data they came from.

Convolution and bilinear upsampling are both linear, and they act on different axes: the
convolution mixes channels at each of its 9 taps, the upsampling mixes pixels per channel. So
for a branch ``x`` (C, h, w) and the convolution's slice ``W`` (K, C, 3, 3) of the weight::

    conv3x3(U x)[k, Y, X] = sum_{dy, dx} sum_{y, x} Ah[dy][Y, y] * Aw[dx][X, x] * (W[:, :, dy, dx] x)[k, y, x]

where ``Ah[dy]`` / ``Aw[dx]`` are the 1-D interpolation matrices (align_corners=True) with their
rows shifted by the tap offset (zero rows where the tap falls in the zero padding). The channel
mixing runs at the branch's own resolution (one matrix product for all 9 taps), then two thin
matrix products along W and H apply interpolation and tap shifts together. For HRT-S at
256x512 that takes the stride-16 and stride-32 branches from 58 GFLOPs to ~3 GFLOPs (forward;
backward alike), and the upsampled maps and their concatenation are never built. The result is
the same linear map, so outputs equal the upsample-then-convolve ones to float rounding.

Branches whose upsampling factor is small (stride 4 itself, and stride 8 where the thin products
would cost about as much as the convolution) are upsampled and convolved directly, in one call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F

# Factorise a branch only when that needs at most this fraction of the direct convolution's
# multiply-adds: the thin matrix products run at a lower rate than a large convolution.
FACTORISE_BELOW = 0.5
_enabled = True


@contextmanager
def factorisation(enabled: bool) -> Iterator[None]:
    """Switch the factorised path off (``False``) inside the block, e.g. to count the FLOPs of the
    plain upsample-then-convolve arithmetic or to time it against the factorised one."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def _tap_matrix_f64(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, 3 * n_in)``: bilinear (align_corners=True) resampling ``n_in -> n_out`` for the
    three taps of a 3x3 convolution with padding 1, side by side: block ``d`` maps input row ``i``
    to output row ``Y`` with the weight that interpolation gives output row ``Y + d - 1``."""
    dst = torch.arange(n_out, dtype=torch.float64)
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0  # PyTorch's align_corners rule
    src = dst * scale
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    frac = src - i0
    rows = torch.arange(n_out)
    interp = torch.zeros(n_out, n_in, dtype=torch.float64)
    interp.index_put_((rows, i0), 1 - frac, accumulate=True)
    interp.index_put_((rows, i1), frac, accumulate=True)
    zero = interp.new_zeros(1, n_in)
    taps = (torch.cat([zero, interp[:-1]]), interp, torch.cat([interp[1:], zero]))
    return torch.cat(taps, 1)


@lru_cache(maxsize=128)
def _cached_tap_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # A normal tensor even when first asked for under ``torch.inference_mode`` (prediction,
    # evaluation): a cached inference tensor would make every later training step in the same
    # process fail ("Inference tensors cannot be saved for backward").
    with torch.inference_mode(False):
        return _tap_matrix_f64(n_in, n_out).to(device=device, dtype=dtype)


def tap_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:func:`_tap_matrix_f64` in ``dtype`` on ``device``, cached per size, dtype and device (no
    host-to-device copy per forward on GPU). Under torch.compile it is built in the graph
    instead, since dynamo does not honour ``lru_cache``."""
    if torch.compiler.is_compiling():
        return _tap_matrix_f64(n_in, n_out).to(device=device, dtype=dtype)
    return _cached_tap_matrix(n_in, n_out, dtype, device)


def _factorised_cost(c: int, h: int, w: int, k: int, out_h: int, out_w: int) -> int:
    """Multiply-adds of :func:`_upsample_conv_factorised`."""
    return h * w * c * 9 * k + 3 * k * h * out_w * 3 * w + k * out_h * out_w * 3 * h


def _upsample_conv_factorised(x: torch.Tensor, weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``conv2d(interpolate(x, size, bilinear, align_corners=True), weight, padding=1)``, bias-free,
    as a channels-last ``(n, out_h, out_w, k)`` tensor."""
    n, c, h, w = x.shape
    out_h, out_w = size
    k = weight.shape[0]
    # Channel mixing for all 9 taps at the branch's resolution: rows (n, y, x), columns (dy, dx, k).
    z = x.permute(0, 2, 3, 1).reshape(n * h * w, c) @ weight.permute(1, 2, 3, 0).reshape(c, 9 * k)
    # Along W: for every (n, dy, y), contract (dx, x) with the tap matrix -> (n, dy, y, out_w, k).
    z = z.view(n, h, w, 3, 3, k).permute(0, 3, 1, 4, 2, 5).reshape(n * 3 * h, 3 * w, k)
    # In z's dtype: under autocast that is the autocast dtype, and a cached matrix of that dtype
    # saves autocast a cast per call.
    t = tap_matrix(w, out_w, z.dtype, x.device) @ z
    # Along H: contract (dy, y) -> (n, out_h, out_w * k), i.e. channels-last.
    out = tap_matrix(h, out_h, t.dtype, x.device) @ t.view(n, 3 * h, out_w * k)
    return out.view(n, out_h, out_w, k)


def upsample_concat_conv3x3(
    xs: list[torch.Tensor], size: tuple[int, int], weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``conv2d(cat([interpolate(x, size) for x in xs], 1), weight, bias, padding=1)``.

    ``interpolate`` is bilinear with ``align_corners=True`` (maps already at ``size`` pass as they
    are), as in the official OCR head. Coarse branches go through the factorised form (module
    docstring); the rest are upsampled, concatenated and convolved in one call. The result is
    ``(n, k, out_h, out_w)`` in channels-last memory (``.permute(0, 2, 3, 1)`` is contiguous).
    """
    out_h, out_w = size
    k = weight.shape[0]
    direct_x: list[torch.Tensor] = []
    direct_w: list[torch.Tensor] = []
    factorised: list[torch.Tensor] = []
    channels = [x.shape[1] for x in xs]
    if sum(channels) != weight.shape[1]:
        raise ValueError(f"branches have {sum(channels)} channels, the weight expects {weight.shape[1]}")
    for x, part in zip(xs, weight.split(channels, 1), strict=True):
        _, c, h, w = x.shape
        resized = (h, w) != (out_h, out_w)
        cheaper = _factorised_cost(c, h, w, k, out_h, out_w) < FACTORISE_BELOW * out_h * out_w * c * 9 * k
        if _enabled and resized and cheaper:
            factorised.append(_upsample_conv_factorised(x, part, size))
            continue
        x = x.contiguous(memory_format=torch.channels_last)
        if resized:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        direct_x.append(x)
        direct_w.append(part)
    out: torch.Tensor | None = None
    if direct_x:
        x = torch.cat(direct_x, 1) if len(direct_x) > 1 else direct_x[0]
        w = torch.cat(direct_w, 1) if len(direct_w) > 1 else direct_w[0]
        out = F.conv2d(x, w, bias, padding=1)  # x is channels-last: each part was made so
        out = out.permute(0, 2, 3, 1).contiguous()  # a view: the convolution keeps channels-last
        bias = None
    for y in factorised:  # not in place: on a view that would make autograd copy the whole base
        out = y if out is None else out + y
    assert out is not None
    if bias is not None:
        # In out's dtype: an fp32 bias would promote an autocast (bf16/fp16) result to fp32.
        out = out + bias.to(out.dtype)
    return out.permute(0, 3, 1, 2)

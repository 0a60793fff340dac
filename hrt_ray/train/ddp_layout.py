"""Give every parameter the memory layout its gradient comes out in, before DDP builds buckets.

DDP lays each bucket view out with its parameter's strides and compares every incoming gradient
with it (``Grad strides do not match bucket view strides``); a mismatch costs a strided copy per
bucket per step. In HRT the mismatches are all in size-1 dimensions, so the memory order is the
same but the strides differ:

- depthwise ``(C, 1, k, k)`` weights: run on channels-last input, their gradient comes out with
  channels-last strides ``(k*k, 1, k, 1)``, the parameter has ``(k*k, k*k, k, 1)``;
- 1x1 ``(O, I, 1, 1)`` weights run as ``F.linear(x, w.flatten(1))``: the gradient is contiguous,
  while ``model.to(memory_format=channels_last)`` gave the parameter ``(I, 1, I, I)``; the same
  weights used by a real convolution on channels-last input get the opposite pair.

Which weight gets which depends on the kernels each path runs, so rather than a rule per module
this runs one probe forward/backward (at the training layout and autocast dtype) and re-lays each
parameter whose gradient strides differ as ``empty_strided(grad.stride()).copy_(param)``: the same
values (state_dicts are unchanged), and autograd keeps stealing gradients of that layout, so
DDP's check holds on every step with no copy. BN statistics and RNG states are restored after the
probe, so training is bit-for-bit the run it would have been.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from hrt_ray.train.loss import segmentation_loss


def align_parameter_layouts(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    loss_args: dict[str, Any],
    amp_dtype: torch.dtype | None,
) -> list[str]:
    """Re-lay parameters to their gradients' strides (see the module docstring); returns their names.

    Call before wrapping in DDP and before the first step; ``images``/``masks`` are a probe batch
    in the training layout (random values do: only the layouts matter).
    """
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = model.training
    params = dict(model.named_parameters())
    saved_grads = {name: p.grad for name, p in params.items()}
    for p in params.values():
        p.grad = None
    changed: list[str] = []
    try:
        model.train()
        autocast = (
            torch.autocast(device_type=images.device.type, dtype=amp_dtype)
            if amp_dtype
            else contextlib.nullcontext()
        )
        with autocast:
            outputs = model(images)
        loss, _ = segmentation_loss(outputs, masks, **loss_args)
        loss.backward()
        with torch.no_grad():
            for name, p in params.items():
                g = p.grad
                if g is None or g.stride() == p.stride() or g.shape != p.shape:
                    continue
                relaid = torch.empty_strided(p.shape, g.stride(), dtype=p.dtype, device=p.device)
                relaid.copy_(p.detach())
                p.data = relaid
                changed.append(name)
    finally:
        for name, p in params.items():
            p.grad = saved_grads[name]
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(buffers[name])
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        model.train(was_training)
    return changed


def probe_batch(
    crop_size: list[int] | None, num_classes: int, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A two-image random batch at the training crop (64x64 if none is set), in the training layout."""
    h, w = crop_size or [64, 64]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, h, w, generator=gen).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, num_classes, (2, h, w), generator=gen).to(device)
    return images, masks

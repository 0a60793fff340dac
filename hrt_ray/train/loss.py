"""Segmentation losses as the official HRT recipe trains them (``fs_auxohemce_loss``).

``loss = ohem_ce(out) + aux_weight * ce(aux)``, ignore label 255. OHEM keeps the pixels whose
predicted probability of the true class is below ``max(thresh, p_k)``, where ``p_k`` is the
``min_kept``-th smallest such probability, so at least ``min_kept`` hard pixels always count.

Why ``kthvalue`` and not ``sort``: the reference sorts every valid pixel each step (e.g. 4M
pixels per batch at 512x1024). Only one order statistic is needed, and ``kthvalue`` is a
selection (linear time), not a sort; when ``thresh`` already keeps enough pixels it is skipped.

All of it runs in fp32 even under autocast: softmax over logits and log-probabilities lose too
much in bf16/fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy(
    logits: Tensor, target: Tensor, ignore_index: int = 255, weight: Tensor | None = None
) -> Tensor:
    """Mean cross-entropy over non-ignored pixels (0 if none), in fp32."""
    logits = logits.float()
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index)


def ohem_cross_entropy(
    logits: Tensor,
    target: Tensor,
    thresh: float = 0.7,
    min_kept: int = 100000,
    ignore_index: int = 255,
    weight: Tensor | None = None,
) -> Tensor:
    """Online hard example mining cross-entropy: the mean per-pixel loss over the kept pixels.

    Kept: valid pixels with ``p(true class) < max(thresh, k-th smallest p)``, with
    ``k = min(min_kept, n_valid - 1) + 1`` (the reference's indexing). As in the reference the
    class weights scale each pixel's loss but the mean is over the kept count.
    """
    logits = logits.float()
    flat_target = target.reshape(-1)
    valid = flat_target != ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0:
        return logits.sum() * 0.0
    pixel_loss = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none")
    pixel_loss = pixel_loss.reshape(-1)[valid]
    with torch.no_grad():
        log_prob = F.log_softmax(logits, dim=1)
        safe_target = torch.where(target == ignore_index, torch.zeros_like(target), target)
        prob = log_prob.gather(1, safe_target.unsqueeze(1)).exp().reshape(-1)[valid]
        threshold = torch.tensor(thresh, dtype=prob.dtype, device=prob.device)
        k = min(max(min_kept, 1), n_valid - 1) + 1 if n_valid > 1 else 1
        # p_k only matters if fewer than k pixels fall below thresh.
        if int((prob < threshold).sum()) < k:
            kth = prob.kthvalue(k).values
            threshold = torch.maximum(threshold, kth)
        kept = prob < threshold
    if not bool(kept.any()):
        return pixel_loss.sum() * 0.0
    return pixel_loss[kept].mean()


def segmentation_loss(
    outputs: dict[str, Tensor],
    target: Tensor,
    *,
    ohem: bool = True,
    ohem_thresh: float = 0.7,
    ohem_min_kept: int = 100000,
    aux_weight: float = 0.4,
    ignore_index: int = 255,
    class_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss of a ``{"out", "aux"}`` model output and its parts (detached, for logging)."""
    if ohem:
        main = ohem_cross_entropy(
            outputs["out"], target, ohem_thresh, ohem_min_kept, ignore_index, class_weights
        )
    else:
        main = cross_entropy(outputs["out"], target, ignore_index, class_weights)
    total = main
    parts = {"loss_main": main.detach()}
    if aux_weight > 0 and "aux" in outputs:
        aux = cross_entropy(outputs["aux"], target, ignore_index, class_weights)
        total = total + aux_weight * aux
        parts["loss_aux"] = aux.detach()
    return total, parts

"""The HRT + OCR segmentation models: ``build_model(name, num_classes)`` and ``load_checkpoint``.

Names map to builders in a plain dict; the ``_w13``/``_w15`` names are the published window-size
variants of HRT-B, and ``window_size=`` overrides any name's window for ablations. Model and
state_dict layout are the official HRFormer ``*_OCR_V2`` ones, so released checkpoints load.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from hrt_ray.models.checkpoint import LoadReport, checkpoint_filter_fn, load_checkpoint
from hrt_ray.models.hrformer import SETTINGS, HighResolutionTransformer, create_hrformer
from hrt_ray.models.ocr import HRTOCR

__all__ = [
    "HRTOCR",
    "HighResolutionTransformer",
    "LoadReport",
    "build_model",
    "checkpoint_filter_fn",
    "default_window_size",
    "list_models",
    "load_checkpoint",
]


def _hrt_ocr(
    variant: str,
    published_window: int,
    num_classes: int,
    window_size: int | None = None,
    *,
    drop_path_rate: float | None = None,
    activation_checkpointing: bool = False,
    channels_last: bool = False,
) -> HRTOCR:
    window = published_window if window_size is None else window_size
    backbone = create_hrformer(variant, window_size=window, drop_path_rate=drop_path_rate)
    backbone.set_grad_checkpointing(activation_checkpointing)
    model = HRTOCR(backbone, sum(SETTINGS[variant].channels), num_classes)
    if channels_last:
        model.channels_last = True
        model.to(memory_format=torch.channels_last)
    return model


# name -> builder(num_classes, window_size=None, **options); w13/w15 are HRT-B's published windows.
_MODELS: dict[str, Callable[..., HRTOCR]] = {
    "hrt_tiny_ocr": partial(_hrt_ocr, "hrt_tiny", 7),
    "hrt_small_ocr": partial(_hrt_ocr, "hrt_small", 7),
    "hrt_base_ocr": partial(_hrt_ocr, "hrt_base", 7),
    "hrt_base_w13_ocr": partial(_hrt_ocr, "hrt_base", 13),
    "hrt_base_w15_ocr": partial(_hrt_ocr, "hrt_base", 15),
}


def list_models() -> list[str]:
    """The names :func:`build_model` accepts."""
    return list(_MODELS)


def default_window_size(name: str) -> int:
    """The window size ``name`` is built with when ``window_size`` is not overridden."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return int(_MODELS[name].args[1])


def build_model(
    name: str,
    num_classes: int,
    window_size: int | None = None,
    *,
    drop_path_rate: float | None = None,
    activation_checkpointing: bool = False,
    channels_last: bool = False,
) -> HRTOCR:
    """Build ``name`` (see :func:`list_models`) with ``num_classes`` outputs.

    ``window_size`` overrides the name's window (any positive integer). ``drop_path_rate``
    overrides the variant's (0.2 for HRT-S/B, as the official configs; 0 for HRT-T).
    ``activation_checkpointing`` recomputes transformer blocks in backward (memory at 1024x2048);
    ``channels_last`` stores weights and runs the convolutions in NHWC memory layout.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name](
        num_classes,
        window_size,
        drop_path_rate=drop_path_rate,
        activation_checkpointing=activation_checkpointing,
        channels_last=channels_last,
    )

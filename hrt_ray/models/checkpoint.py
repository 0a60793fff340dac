"""Load our checkpoints, the official HRFormer segmentation checkpoints and the official
ImageNet-pretrained backbones into an :class:`~hrt_ray.models.ocr.HRTOCR` model.

Three layouts are recognised from their keys, not from file names:

* a full segmentation model (keys ``backbone.*``, ``conv3x3.*``, ...): our trainer's checkpoint
  (state_dict under ``"model"``), an official segmentation checkpoint (raw or under
  ``"state_dict"``), with or without the ``module.`` prefix of DataParallel/DDP;
* an ImageNet-pretrained backbone (official ``cls/`` layout under ``"model"``: backbone keys
  without prefix plus the classification head ``incre_modules``/``downsamp_modules``/
  ``final_layer``/``classifier``): the head is dropped, the rest goes into ``model.backbone``, and
  relative position bias tables trained with another window size are resized bilinearly, as the
  official ``ModuleHelper.load_model(network="hrt_window")`` does.

Mapping is a pure function (:func:`checkpoint_filter_fn`); the model never special-cases foreign
layouts. Files are read with ``weights_only=True``: a checkpoint cannot run code.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hrt_ray import storage

IMAGENET_HEAD_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
_DERIVED_SUFFIX = "relative_position_index"  # a buffer computed from the window size


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded into the model; the message names the URI and the key."""


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did."""

    uri: str
    layout: str  # "model" (full segmentation model) or "backbone" (ImageNet-pretrained backbone)
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.uri}: loaded {self.loaded} tensors into the {self.layout}"]
        for label, keys in (
            ("missing (left as initialised)", self.missing),
            ("unexpected (ignored)", self.unexpected),
            ("dropped (ImageNet head)", self.dropped),
            ("resized (relative position bias)", self.resized),
        ):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                lines.append(f"  {label}: {shown}")
        return "\n".join(lines)


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: object, uri: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The tensors of a raw state_dict or of one under ``model``/``state_dict``, ``module.`` stripped."""
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        found = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{uri}: no state_dict found (expected a dict of tensors, or one under "
            f"{'/'.join(_WRAPPER_KEYS)}); found {found}"
        )
    assert isinstance(obj, dict)
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _resize_bias_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """``((2w-1)**2, heads)`` -> ``(size**2, heads)`` by bilinear interpolation (official rule)."""
    src = math.isqrt(table.shape[0])
    grid = table.t().reshape(1, table.shape[1], src, src)
    return F.interpolate(grid, size=(size, size), mode="bilinear").reshape(table.shape[1], -1).t()


def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor], model: nn.Module
) -> tuple[str, dict[str, torch.Tensor], list[str], list[str]]:
    """Map a checkpoint's tensors onto ``model``'s names.

    Returns ``(layout, state_dict, dropped, resized)``: ``layout`` is ``"model"`` when the keys
    are a full segmentation model's (load into ``model``) and ``"backbone"`` for an ImageNet
    backbone (load into ``model.backbone``); ``dropped`` lists the classification-head keys left
    out and ``resized`` the bias tables interpolated to the model's window size.
    """
    if any(k.startswith("backbone.") for k in state_dict):
        return "model", dict(state_dict), [], []
    target = getattr(model, "backbone", model)
    own = target.state_dict()
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    resized: list[str] = []
    for key, value in state_dict.items():
        if key.startswith(IMAGENET_HEAD_PREFIXES):
            dropped.append(key)
        elif key.endswith(_DERIVED_SUFFIX) and key in own:
            out[key] = own[key]  # recomputed for the model's window size
        elif key.endswith("relative_position_bias_table") and key in own and own[key].shape != value.shape:
            out[key] = _resize_bias_table(value, math.isqrt(own[key].shape[0]))
            resized.append(key)
        else:
            out[key] = value
    return "backbone", out, dropped, resized


def load_checkpoint(
    model: nn.Module, path_or_uri: str, endpoint: str | None = None, strict: bool = True
) -> LoadReport:
    """Load ``path_or_uri`` (local path, ``s3://``, ``gs://``) into ``model`` and report what happened.

    A full-model checkpoint must match key for key when ``strict`` (the default); an ImageNet
    backbone fills ``model.backbone`` and leaves the head as initialised. A tensor whose shape does
    not fit always raises :class:`CheckpointError` naming the key and both shapes.
    """
    try:
        raw = torch.load(
            io.BytesIO(storage.read_bytes(path_or_uri, endpoint)), map_location="cpu", weights_only=True
        )
    except storage.StorageError:
        raise
    except Exception as exc:  # unpickling errors come in many types; name the file
        raise CheckpointError(
            f"{path_or_uri}: not a loadable torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    layout, state_dict, dropped, resized = checkpoint_filter_fn(unwrap_state_dict(raw, path_or_uri), model)
    target = model if layout == "model" else getattr(model, "backbone", model)
    own = target.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointError(
            f"{path_or_uri}: {len(mismatched)} tensor(s) do not fit the model "
            f"({type(model).__name__}): " + "; ".join(mismatched[:10])
        )
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path_or_uri}: keys do not match the model: missing {missing[:10]} "
            f"({len(missing)} in all), unexpected {unexpected[:10]} ({len(unexpected)} in all)"
        )
    target.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return LoadReport(
        uri=path_or_uri,
        layout=layout,
        loaded=len(state_dict) - len(unexpected),
        missing=missing,
        unexpected=unexpected,
        dropped=dropped,
        resized=resized,
    )

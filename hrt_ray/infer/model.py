"""A checkpoint ready for inference on uint8 images, with the evaluation's test-time options.

Why a wrapper: ``hrt-ray predict``, ``hrt-ray visualize`` and ``hrt-ray export`` all need the same
three things the evaluation already defines -- the model built from the config and loaded from a
checkpoint (``hrt_ray.models``), the ImageNet normalisation and channel order of the data
pipeline (``hrt_ray.data.transforms``), and whole / sliding-window / multi-scale inference
(``hrt_ray.eval.inference.predict``). This module only wires them together; it re-implements none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hrt_ray.config import ExperimentConfig
from hrt_ray.data import resolve_num_classes
from hrt_ray.data.pipeline import resolve_spec
from hrt_ray.data.specs import DatasetSpec
from hrt_ray.data.transforms import normalize
from hrt_ray.eval.inference import autocast_dtype, eval_window, predict
from hrt_ray.eval.run import checkpoint_file
from hrt_ray.models import build_model, load_checkpoint


@dataclass(frozen=True)
class InferenceOptions:
    """The evaluation's test setting (``cfg.eval``), resolved to concrete values."""

    mode: str
    scales: tuple[float, ...]
    flip: bool
    crop: tuple[int, int] | None
    stride: tuple[int, int] | None

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> InferenceOptions:
        crop, stride = eval_window(cfg)
        return cls(
            mode=cfg.eval.mode,
            scales=tuple(float(s) for s in cfg.eval.scales),
            flip=bool(cfg.eval.flip),
            crop=tuple(crop) if crop else None,  # type: ignore[arg-type]
            stride=tuple(stride) if stride else None,  # type: ignore[arg-type]
        )

    def describe(self) -> str:
        scales = ",".join(f"{s:g}" for s in self.scales)
        window = f" crop {self.crop} stride {self.stride}" if self.mode == "slide" else ""
        return f"{self.mode}{window}, scales {scales}" + (", flip" if self.flip else "")


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU Ray assigned to this process (or any visible one), else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError("a GPU was requested but torch sees none (CUDA_VISIBLE_DEVICES / Ray num_gpus?)")
    return torch.device("cuda" if device in ("gpu", "cuda") else device)


def load_model(cfg: ExperimentConfig, checkpoint: str, num_classes: int) -> torch.nn.Module:
    """``cfg.model.arch`` with ``num_classes`` outputs, weights from ``checkpoint``, in eval mode."""
    model = build_model(cfg.model.arch, num_classes, window_size=cfg.model.window_size)
    load_checkpoint(model, checkpoint_file(checkpoint), endpoint=cfg.storage.endpoint)
    return model.eval()


class Segmenter:
    """``segmenter(images) -> train-id maps``: one model, the evaluation's test setting, reused per call.

    Images are uint8 RGB ``(H, W, 3)`` of any sizes; images of the same size are stacked into one
    forward pass of up to ``batch_size`` (sizes differ across a folder of photos, so batching by
    size is what keeps a GPU busy without padding that would change the prediction).
    Build it from a checkpoint with :meth:`load`, or around a model in memory (the training loop).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        model: torch.nn.Module,
        num_classes: int,
        spec: DatasetSpec,
        device: torch.device,
        *,
        batch_size: int = 4,
        options: InferenceOptions | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.num_classes = num_classes
        self.spec = spec
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.options = options or InferenceOptions.from_config(cfg)
        self.channel_order = cfg.data.channel_order
        self.amp_dtype = autocast_dtype(cfg, device)

    @classmethod
    def load(
        cls,
        cfg: ExperimentConfig,
        checkpoint: str,
        *,
        device: str = "auto",
        batch_size: int = 4,
        spec: DatasetSpec | None = None,
        num_classes: int | None = None,
    ) -> Segmenter:
        """The config's model with ``checkpoint``'s weights on ``device``.

        ``spec``/``num_classes`` default to the config's (``resolve_spec``/``resolve_num_classes``);
        a driver passes them in so workers need not reach the spec file or shard manifest.
        """
        num_classes = num_classes or resolve_num_classes(cfg)
        dev = pick_device(device)
        model = load_model(cfg, checkpoint, num_classes).to(dev)
        return cls(cfg, model, num_classes, spec or resolve_spec(cfg), dev, batch_size=batch_size)

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB -> float32 ``(3, H, W)`` exactly as the validation pipeline feeds the model."""
        if self.channel_order == "BGR":
            image = np.ascontiguousarray(image[..., ::-1])
        return normalize(image)

    @torch.inference_mode()
    def predict_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised ``(N, 3, H, W)`` -> ``(N, H, W)`` int64 train ids, with the eval options."""
        o = self.options
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype
            else contextlib.nullcontext()
        )
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast:
                return predict(
                    self.model,
                    batch.to(self.device),
                    self.num_classes,
                    mode=o.mode,
                    scales=o.scales,
                    flip=o.flip,
                    crop=o.crop,
                    stride=o.stride,
                )
        finally:
            self.model.train(was_training)

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """uint8 RGB images -> uint8 ``(H, W)`` train-id maps, in the input order."""
        out: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[:2]), []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = torch.from_numpy(np.stack([self.normalize(images[i]) for i in chunk]))
                pred = self.predict_tensor(batch).to("cpu", torch.uint8).numpy()
                for i, p in zip(chunk, pred, strict=True):
                    out[i] = p
        return out  # type: ignore[return-value]

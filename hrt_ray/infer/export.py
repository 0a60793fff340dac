"""``hrt-ray export``: a checkpoint as TorchScript or ONNX for serving outside Ray, checked vs eager.

The exported graph maps a normalised image batch ``(N, 3, H, W)`` float32 (ImageNet mean/std, in
the config's channel order) to logits ``(N, K, H, W)``; ``argmax`` over K gives train ids. A JSON
file beside it records everything a server needs to pre/post-process the same way (size, channel
order, mean/std, class names, palette).

**Fixed input size.** Both formats are exported for one ``--size HxW`` and batch size
(``--batch``): window attention pads each branch to a multiple of the window, and that padding is
computed from the input shape, so a TorchScript trace bakes the shape in (running it at another
size fails) and ``torch.export``'s dynamic shapes would need the model changed. A server runs the
exported graph on crops of that size (sliding window) or resizes to it.

**ONNX** uses the TorchScript-based exporter (``dynamo=False``): torch 2.13's ``torch.export``
path fails on the attention's ``scaled_dot_product_attention`` decomposition (a stride mismatch
on the following reshape). It needs the ``onnx`` package; the check runs ``onnxruntime``.

**Check.** The exported file is read back from where it was written and run on a seeded random
input and on a smooth synthetic image; the export fails unless the logits agree with the eager
model within ``atol + rtol * max|logits|`` and the argmax agrees on at least 99.9% of pixels.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hrt_ray import storage
from hrt_ray.data import resolve_num_classes
from hrt_ray.data.pipeline import resolve_spec
from hrt_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from hrt_ray.eval.run import checkpoint_file
from hrt_ray.infer.model import load_model

FORMATS = {"torchscript": ".ts", "onnx": ".onnx"}
#: Tolerances per format: TorchScript reruns the same kernels; ONNX Runtime has its own.
TOLERANCE = {"torchscript": (1e-4, 1e-4), "onnx": (1e-3, 1e-3)}
MIN_ARGMAX_AGREEMENT = 0.999


class ExportError(RuntimeError):
    """Export failed or the exported model disagrees with the eager one; the message says how."""


@dataclass
class ExportResult:
    uri: str
    meta_uri: str
    format: str
    size: tuple[int, int]
    max_abs_diff: float
    argmax_agreement: float
    seconds: float




def default_size(cfg: Any) -> tuple[int, int]:
    """The evaluation crop (sliding window), else the training crop, else the dataset's crop."""
    crop = cfg.eval.crop_size or cfg.data.crop_size or resolve_spec(cfg).crop_size
    return int(crop[0]), int(crop[1])


def _logits_module(model: Any) -> Any:
    """The model with a tensor-only output (exporters want tensors, the model returns a dict)."""
    class Logits(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.inner(images)["out"]

    return Logits(model).eval()


def _check_inputs(shape: tuple[int, int, int, int]) -> list[Any]:
    """A seeded N(0,1) batch and a smooth, image-like one (gradients + a bright square)."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=gen)
    n, c, h, w = shape
    yy = torch.linspace(-2, 2, h).view(1, 1, h, 1)
    xx = torch.linspace(-2, 2, w).view(1, 1, 1, w)
    smooth = (yy + xx).expand(n, c, h, w).clone()
    smooth[..., h // 4 : h // 2, w // 4 : w // 2] = 2.0
    return [noise, smooth]


def _to_bytes(fmt: str, module: Any, example: Any) -> bytes:
    buf = io.BytesIO()
    with torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(module, example, check_trace=False)
            torch.jit.save(traced, buf)
        else:
            try:
                # deferred: onnx is the optional [export] extra, needed only for --format onnx
                import onnx  # noqa: F401  (the exporter needs it; fail with a clear message)
            except ImportError as exc:
                raise ExportError(
                    "ONNX export needs the onnx package (pip install -r requirements.txt)"
                ) from exc
            torch.onnx.export(
                module,
                (example,),
                buf,
                dynamo=False,
                opset_version=17,
                input_names=["image"],
                output_names=["logits"],
            )
    return buf.getvalue()


def _runner(fmt: str, data: bytes) -> Any:
    """A callable ``float32 tensor -> numpy logits`` over the exported bytes."""
    if fmt == "torchscript":
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
        return lambda x: loaded(x).detach().numpy()
    try:
        # deferred: onnxruntime is the optional [export] extra, needed only for --format onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError(
            "checking an ONNX export needs onnxruntime (pip install -r requirements.txt)"
        ) from exc
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x.numpy()})[0]


def export_checkpoint(
    cfg: Any,
    checkpoint: str,
    fmt: str,
    *,
    size: tuple[int, int] | None = None,
    batch: int = 1,
    out: str | None = None,
) -> ExportResult:
    """Export ``checkpoint`` (config's arch/classes) to ``fmt``, write it and check it vs eager."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    start = time.perf_counter()
    endpoint = cfg.storage.endpoint
    ckpt = checkpoint_file(checkpoint)
    if not storage.exists(ckpt, endpoint):
        raise ExportError(f"{ckpt}: checkpoint not found")
    h, w = size or default_size(cfg)
    num_classes = resolve_num_classes(cfg)
    model = load_model(cfg, ckpt, num_classes)
    model.channels_last = False  # a layout choice for training speed; exporters want plain NCHW
    module = _logits_module(model)
    shape = (int(batch), 3, h, w)
    inputs = _check_inputs(shape)
    data = _to_bytes(fmt, module, inputs[0])
    uri = out or f"{ckpt.rsplit('/', 1)[0]}/model-{h}x{w}{FORMATS[fmt]}"
    storage.write_bytes(uri, data, endpoint)

    run_exported = _runner(fmt, storage.read_bytes(uri, endpoint))
    atol, rtol = TOLERANCE[fmt]
    worst, agreement = 0.0, 1.0
    for x in inputs:
        with torch.no_grad():
            ref = module(x).numpy()
        got = run_exported(x)
        if got.shape != ref.shape:
            raise ExportError(f"{uri}: exported output shape {got.shape} != eager {ref.shape}")
        diff = float(np.abs(got - ref).max())
        worst = max(worst, diff)
        agreement = min(agreement, float((got.argmax(1) == ref.argmax(1)).mean()))
        if diff > atol + rtol * float(np.abs(ref).max()):
            raise ExportError(f"{uri}: logits differ from the eager model by up to {diff:.3g} (atol {atol})")
    if agreement < MIN_ARGMAX_AGREEMENT:
        raise ExportError(
            f"{uri}: argmax agrees with the eager model on only {100 * agreement:.3f}% of pixels"
        )

    spec = resolve_spec(cfg)
    meta = {
        "format": fmt,
        "checkpoint": ckpt,
        "arch": cfg.model.arch,
        "input": {"name": "image", "shape": list(shape), "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "logits", "shape": [int(batch), num_classes, h, w], "argmax_axis": 1},
        "preprocess": {
            "channel_order": cfg.data.channel_order,
            "scale": 1 / 255,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "class_names": list(spec.class_names) if spec.num_classes == num_classes else None,
        "palette": [list(p) for p in spec.palette] if spec.num_classes == num_classes else None,
        "check": {"max_abs_diff": worst, "argmax_agreement": agreement, "atol": atol, "rtol": rtol},
    }
    meta_uri = f"{uri}.json"
    storage.write_bytes(meta_uri, json.dumps(meta, indent=2).encode(), endpoint)
    return ExportResult(uri, meta_uri, fmt, (h, w), worst, agreement, time.perf_counter() - start)

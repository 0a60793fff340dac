"""Confusion-matrix metrics against NumPy; whole / sliding-window / multi-scale inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hrt_ray.eval.inference import predict, predict_probs, slide_logits, whole_logits
from hrt_ray.eval.metrics import confusion_matrix, metrics_from_confusion


def numpy_metrics(pred: np.ndarray, gt: np.ndarray, n: int, ignore: int = 255):
    keep = gt != ignore
    cm = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(gt[keep].ravel(), pred[keep].ravel(), strict=True):
        cm[t, p] += 1
    ious = []
    for c in range(n):
        inter = cm[c, c]
        union = cm[c, :].sum() + cm[:, c].sum() - inter
        ious.append(inter / union if union else np.nan)
    return cm, np.array(ious), np.trace(cm) / cm.sum()


def test_confusion_matrix_and_metrics_match_numpy() -> None:
    rng = np.random.default_rng(0)
    n = 6
    gt = rng.integers(0, n, size=(3, 17, 23))
    gt[rng.random(gt.shape) < 0.1] = 255
    gt[gt == 4] = 5  # class 4 absent from ground truth...
    pred = rng.integers(0, n, size=gt.shape)
    pred[pred == 4] = 3  # ...and from predictions: its IoU is undefined, not 0
    cm_np, iou_np, acc_np = numpy_metrics(pred, gt, n)
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), n)
    assert np.array_equal(cm.numpy(), cm_np)
    m = metrics_from_confusion(cm)
    assert np.allclose(np.array(m.iou), iou_np, equal_nan=True)
    assert m.miou == pytest.approx(np.nanmean(iou_np))
    assert m.pixel_acc == pytest.approx(acc_np)
    assert m.support == cm_np.sum(1).tolist()
    report = m.as_report("val/", [f"c{i}" for i in range(n)])
    assert "val/IoU/c4" not in report and report["val/mIoU"] == pytest.approx(m.miou)
    # Summing per-worker matrices equals the matrix of all pixels (what the all-reduce does).
    halves = [
        confusion_matrix(torch.from_numpy(p), torch.from_numpy(g), n)
        for p, g in ((pred[:1], gt[:1]), (pred[1:], gt[1:]))
    ]
    assert torch.equal(halves[0] + halves[1], cm)


class PixelModel(nn.Module):
    """A translation-equivariant stand-in (pointwise + 3x3 conv) with the model's output dict."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 3, padding=1)
        self.calls: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls.append(tuple(x.shape[-2:]))
        y = self.conv(x)
        return {"out": y, "aux": y}


def test_slide_with_whole_image_crop_equals_whole_inference() -> None:
    model = PixelModel()
    image = torch.randn(2, 3, 40, 56)
    whole = whole_logits(model, image)
    model.calls.clear()
    slid = slide_logits(model, image, 4, crop=(40, 56), stride=(20, 30))
    assert model.calls == [(40, 56)]  # one window covers the image
    assert torch.allclose(slid, whole, atol=1e-6)


def test_slide_windows_cover_the_image_and_average() -> None:
    model = PixelModel()
    image = torch.randn(1, 3, 50, 70)
    model.calls.clear()
    out = slide_logits(model, image, 4, crop=(32, 32), stride=(21, 21))
    assert out.shape == (1, 4, 50, 70)
    assert all(c == (32, 32) for c in model.calls) and len(model.calls) == 2 * 3
    # Away from window borders a 3x3 conv sees the same pixels, so windows agree with whole.
    whole = whole_logits(model, image)
    assert torch.allclose(out[..., 20:30, 23:30], whole[..., 20:30, 23:30], atol=1e-5)
    # An image smaller than the crop is padded then cropped back.
    small = slide_logits(model, torch.randn(1, 3, 20, 25), 4, crop=(32, 32), stride=(21, 21))
    assert small.shape == (1, 4, 20, 25)


def test_multiscale_flip_probabilities() -> None:
    model = PixelModel()
    image = torch.randn(1, 3, 32, 48)
    single = predict_probs(model, image, 4)
    assert torch.allclose(single, whole_logits(model, image).softmax(1), atol=1e-6)
    assert torch.allclose(single.sum(1), torch.ones(1, 32, 48), atol=1e-5)
    model.calls.clear()
    ms = predict_probs(model, image, 4, scales=[0.75, 1.0, 1.25], flip=True)
    assert model.calls == [(24, 36), (24, 36), (32, 48), (32, 48), (40, 60), (40, 60)]
    assert ms.shape == (1, 4, 32, 48)
    assert torch.allclose(ms.sum(1), torch.full((1, 32, 48), 6.0), atol=1e-4)
    # Flip: a mirrored image gives the mirrored prediction.
    flipped_pred = predict(model, image.flip(-1), 4, scales=[1.0], flip=True)
    pred = predict(model, image, 4, scales=[1.0], flip=True)
    assert torch.equal(flipped_pred, pred.flip(-1))
    expected = sum(
        F.interpolate(
            whole_logits(model, F.interpolate(image, scale_factor=s, mode="bilinear")),
            (32, 48),
            mode="bilinear",
        ).softmax(1)
        for s in (0.75, 1.0, 1.25)
    )
    no_flip = predict_probs(model, image, 4, scales=[0.75, 1.0, 1.25])
    assert torch.allclose(no_flip, expected, atol=1e-4)
    slide_ms = predict_probs(model, image, 4, mode="slide", crop=(32, 48), stride=(16, 16), scales=[1.0])
    assert torch.allclose(slide_ms, single, atol=1e-5)
    with pytest.raises(ValueError, match="slide inference needs crop and stride"):
        predict_probs(model, image, 4, mode="slide")


def _one_class_missed(classes: int = 19) -> torch.Tensor:
    """100 pixels per class, all right except the last class's, all predicted as the one before.

    IoU: 1 for the first ``classes - 2``; 100 / (100 + 200 - 100) = 0.5 for the one before the
    last (100 hits, 200 predictions); 0 for the last. With 19 classes mIoU = 17.5 / 19.
    """
    matrix = torch.diag(torch.full((classes,), 100, dtype=torch.int64))
    matrix[classes - 1, classes - 1] = 0
    matrix[classes - 1, classes - 2] = 100
    return matrix


def test_eval_summary_holds_the_result_against_the_job_rows_target() -> None:
    """The result of a real job config: multi-scale against miou_ms, single-scale against miou_ss."""
    from pathlib import Path

    from hrt_ray.config import load_config
    from hrt_ray.eval.run import eval_result

    job = Path(__file__).resolve().parent.parent / "jobs" / "cityscapes-hrt_s_w7-80k-b8-512x1024.yaml"
    ckpt = "/runs/x/ckpt/checkpoint.pt"
    ms_cfg = load_config(job, training=False)  # the row's test: scales 0.75/1/1.25 with flip
    source = ms_cfg.target.source
    ms = eval_result(ms_cfg, ckpt, _one_class_missed())
    assert ms.miou == pytest.approx(17.5 / 19) and ms.classes[0] == "road"
    assert ms.setting == "whole-ms0.75_1_1.25-flip" and ms.scales == "ms"
    assert ms.summary_lines() == [
        "setting whole-ms0.75_1_1.25-flip; written /runs/x/ckpt/eval-whole-ms0.75_1_1.25-flip.json "
        "and /runs/x/ckpt/eval-whole-ms0.75_1_1.25-flip.csv",
        f"target mIoU   81.00 ms ({source}) -> achieved 92.11 (+11.11)",
    ]
    saved = ms.as_json()["target"]
    assert saved["scales"] == "ms" and saved["published_miou"] == 81.0
    assert saved["achieved_miou"] == pytest.approx(100 * 17.5 / 19)
    assert saved["difference"] == pytest.approx(100 * 17.5 / 19 - 81.0)

    ss = eval_result(
        load_config(job, ["eval.scales=[1.0]", "eval.flip=false"], training=False), ckpt, _one_class_missed()
    )
    assert ss.setting == "whole-ss1" and ss.scales == "ss"
    assert ss.summary_lines()[1] == f"target mIoU   80.00 ss ({source}) -> achieved 92.11 (+12.11)"
    assert ss.as_json()["target"]["published_miou"] == 80.0


def test_eval_summary_without_a_target_prints_nothing_extra() -> None:
    from pathlib import Path

    from hrt_ray.config import load_config
    from hrt_ray.eval.run import eval_result

    job = Path(__file__).resolve().parent.parent / "jobs" / "ade20k-hrt_b_w15-150k-b8-520x520.yaml"
    result = eval_result(load_config(job, training=False), "/runs/x/checkpoint.pt", _one_class_missed(150))
    assert len(result.summary_lines()) == 1 and result.summary_lines()[0].startswith("setting whole-ms")
    assert result.target is None and result.as_json()["target"] is None

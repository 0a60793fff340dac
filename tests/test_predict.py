"""``hrt-ray predict``: label/overlay PNGs from Ray Data batch inference, restart, bad images, S3.

The end-to-end run reads its images from a bucket on the loopback S3 server through the real
Ray Data pipeline (one local Ray for the session) and checks the pictures themselves: sizes,
label values in the dataset's original ids, overlay pixels equal to the palette blend.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hrt_ray import storage
from hrt_ray.data.codec import decode_image, encode_png
from hrt_ray.data.specs import get_spec, spec_from_dict
from hrt_ray.data.synth import draw_scene
from hrt_ray.infer.labels import colorize, overlay, to_label_image, train_to_original_lut
from hrt_ray.infer.predict import LABELS_DIR, OVERLAYS_DIR, REPORT_FILE, PredictError, overlay_name, plan

# Three classes whose original ids are 10/20/30 (like Cityscapes labelIds -> trainIds).
SPEC = {
    "name": "tri",
    "class_names": ["sky", "road", "car"],
    "palette": [[250, 10, 10], [10, 250, 10], [10, 10, 250]],
    "label_mapping": {10: 0, 20: 1, 30: 2},
}
SIZES = {"a.png": (40, 56), "b.png": (32, 32), "sub/c.jpg": (48, 40)}


def write_setup(root: Path) -> tuple[str, str]:
    """A dataset spec + config (3 classes) and a random-weight hrt_tiny_ocr checkpoint."""
    import torch
    import yaml

    from hrt_ray.models import build_model

    (root / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    cfg = {"data": {"dataset": str(root / "spec.yaml")}, "model": {"arch": "hrt_tiny_ocr"}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    model = build_model("hrt_tiny_ocr", 3)
    torch.save({"model": model.state_dict()}, root / "ckpt.pt")
    return str(root / "cfg.yaml"), str(root / "ckpt.pt")


def image_bytes(name: str) -> tuple[np.ndarray, bytes]:
    import cv2

    h, w = SIZES[name]
    image, _ = draw_scene(0, "predict", len(name) + h, h, w, 3)
    if name.endswith(".jpg"):
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        assert ok
        return image, buf.tobytes()
    return image, encode_png(image)


def read_png(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


def test_original_ids_invert_the_spec_mapping() -> None:
    cityscapes = train_to_original_lut(get_spec("cityscapes"))
    assert cityscapes[0] == 7 and cityscapes[13] == 26 and cityscapes[18] == 33 and cityscapes[255] == 255
    ade = get_spec("ade20k")
    assert to_label_image(np.array([[0, 149]]), ade, "original").tolist() == [[1, 150]]
    spec = spec_from_dict(SPEC, "test")
    assert to_label_image(np.array([[2, 0, 1]]), spec, "original").tolist() == [[30, 10, 20]]
    assert to_label_image(np.array([[2, 0, 1]]), spec, "train").tolist() == [[2, 0, 1]]
    with pytest.raises(ValueError, match="ids must be"):
        to_label_image(np.zeros((1, 1)), spec, "label")


def test_plan_skips_written_outputs_and_rejects_collisions(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    for name in SIZES:
        storage.write_bytes(str(src / name), image_bytes(name)[1])
    storage.write_bytes(str(src / "notes.txt"), b"not an image, not listed")
    storage.write_bytes(str(dst / LABELS_DIR / "a.png"), b"x")
    storage.write_bytes(str(dst / LABELS_DIR / "sub/c.png"), b"x")
    storage.write_bytes(str(dst / OVERLAYS_DIR / "sub/overlay_c.png"), b"x")

    without = plan(str(src), str(dst), overlay=False)
    assert (without.total, without.done) == (3, 2)
    assert [Path(p).name for p in without.todo] == ["b.png"]
    with_overlay = plan(str(src), str(dst), overlay=True)  # a.png lacks its overlay
    assert sorted(Path(p).name for p in with_overlay.todo) == ["a.png", "b.png"]

    storage.write_bytes(str(src / "a.jpg"), b"same output name as a.png")
    with pytest.raises(PredictError, match=r"a\.png.*a\.jpg|a\.jpg.*a\.png"):
        plan(str(src), str(dst), overlay=False)
    with pytest.raises(PredictError, match="no images"):
        storage.write_bytes(str(tmp_path / "docs" / "notes.txt"), b"text only")
        plan(str(tmp_path / "docs"), str(tmp_path / "elsewhere"), overlay=False)
    with pytest.raises(PredictError, match="source not found"):
        plan(str(tmp_path / "nowhere"), str(tmp_path / "elsewhere"), overlay=False)


def test_plan_on_s3_skips_written_outputs(s3_bucket: str) -> None:
    for name in SIZES:
        storage.write_bytes(f"{s3_bucket}/in/{name}", image_bytes(name)[1])
    storage.write_bytes(f"{s3_bucket}/out/{LABELS_DIR}/b.png", b"x")
    work = plan(f"{s3_bucket}/in", f"{s3_bucket}/out", overlay=False)
    assert (work.total, work.done) == (3, 1)
    assert sorted(p.rsplit("/", 1)[-1] for p in work.todo) == ["a.png", "c.jpg"]


@pytest.mark.slow
def test_predict_cli_from_s3_bucket(ray_session, s3_bucket: str, tmp_path: Path, capsys) -> None:
    from hrt_ray.cli import main

    cfg_path, ckpt = write_setup(tmp_path)
    originals = {}
    for name in SIZES:
        _, data = image_bytes(name)
        originals[name] = decode_image(data, name)  # JPEG: the decoder predict uses
        storage.write_bytes(f"{s3_bucket}/photos/{name}", data)
    storage.write_bytes(f"{s3_bucket}/photos/broken.jpg", b"\xff\xd8 truncated jpeg")
    dst = tmp_path / "out"

    argv = ["predict", "--config", cfg_path, "--checkpoint", ckpt, "--src", f"{s3_bucket}/photos"]
    rc = main([*argv, "--dst", str(dst), "--overlay", "--ids", "original", "--batch-size", "2"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "wrote 3 images" in out.out and "1 unreadable" in out.out
    assert "broken.jpg" in out.out and "broken.jpg" in out.err

    spec = spec_from_dict(SPEC, "test")
    palette = {tuple(c) for c in SPEC["palette"]}
    for name, (h, w) in SIZES.items():
        stem = name.rsplit(".", 1)[0]
        labels = read_png((dst / LABELS_DIR / f"{stem}.png").read_bytes())
        assert labels.shape == (h, w) and labels.dtype == np.uint8
        assert set(np.unique(labels)) <= {10, 20, 30}, name
        train_ids = (labels // 10 - 1).astype(np.uint8)
        over = read_png((dst / OVERLAYS_DIR / overlay_name(name)).read_bytes())
        assert over.shape == (h, w, 3)
        # The overlay is the image blended with the palette colour of each predicted class.
        np.testing.assert_array_equal(over, overlay(originals[name], train_ids, spec))
        assert {tuple(c) for c in colorize(train_ids, spec).reshape(-1, 3)} <= palette
    assert not (dst / LABELS_DIR / "broken.png").exists()
    report = json.loads((dst / REPORT_FILE).read_text())
    assert report["written"] == 3 and report["total"] == 4 and list(report["failed"]) == ["broken.jpg"]
    assert "does not decode" in report["failed"]["broken.jpg"]

    # A restart redoes nothing that was written: only the broken image is tried (and reported) again.
    work = plan(f"{s3_bucket}/photos", str(dst), overlay=True)
    assert [p.rsplit("/", 1)[-1] for p in work.todo] == ["broken.jpg"] and work.done == 3


def test_predict_bad_checkpoint_fails_before_any_actor(tmp_path: Path) -> None:
    from hrt_ray.config import load_config
    from hrt_ray.infer.predict import run_predict

    cfg = load_config(None, ["model.num_classes=3", "data.synth.classes=3"])
    with pytest.raises(PredictError, match="missing.pt: checkpoint not found"):
        run_predict(cfg, str(tmp_path / "missing.pt"), str(tmp_path), str(tmp_path / "out"))
    cfg_path, ckpt = write_setup(tmp_path)  # a 3-class checkpoint...
    with pytest.raises(PredictError, match=r"ckpt\.pt: .*do not fit.*cls_head"):  # ...for a 5-class config
        run_predict(
            load_config(cfg_path, ["model.num_classes=5"]), ckpt, str(tmp_path), str(tmp_path / "out")
        )


def test_segmenter_uses_the_evaluation_test_setting(tmp_path: Path) -> None:
    """Sliding window + multi-scale + flip from ``eval.*`` overrides, same-size images batched."""
    import torch

    from hrt_ray.config import load_config
    from hrt_ray.data.transforms import normalize
    from hrt_ray.eval.inference import predict
    from hrt_ray.infer.model import InferenceOptions, Segmenter

    cfg_path, ckpt = write_setup(tmp_path)
    overrides = ["eval.mode=slide", "eval.crop_size=[32,32]", "eval.stride=[24,24]", "eval.scales=[0.75,1.0]"]
    cfg = load_config(cfg_path, [*overrides, "eval.flip=true"])
    seg = Segmenter.load(cfg, ckpt, device="cpu", batch_size=2)
    assert seg.options == InferenceOptions("slide", (0.75, 1.0), True, (32, 32), (24, 24))
    assert seg.num_classes == 3 and seg.spec.name == "tri"
    square = image_bytes("b.png")[0]  # 32x32; two of them go through one forward pass
    wide = draw_scene(0, "predict", 99, 32, 40, 3)[0]
    preds = seg([square, wide, square[::-1].copy()])
    assert [p.shape for p in preds] == [(32, 32), (32, 40), (32, 32)]
    with torch.no_grad():
        x = torch.from_numpy(normalize(square))[None]
        ref = predict(
            seg.model, x, 3, mode="slide", scales=(0.75, 1.0), flip=True, crop=(32, 32), stride=(24, 24)
        )
    np.testing.assert_array_equal(preds[0], ref[0].numpy())

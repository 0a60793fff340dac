"""``hrt-ray visualize`` and the TensorBoard panel: the picture's geometry and colours are checked.

A panel is input | ground truth | prediction | errors per validation sample. The label tiles
must hold only palette colours (the ignore colour too in the ground truth), and the error tile
must be exactly black where the prediction tile's colour equals the truth's and red elsewhere.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hrt_ray.data.specs import synthetic_spec
from hrt_ray.infer.labels import IGNORE_COLOR
from hrt_ray.infer.visualize import (
    CORRECT_COLOR,
    GAP,
    HEADER,
    IGNORED_COLOR,
    WRONG_COLOR,
    error_map,
    make_panel,
)

H, W, CLASSES = 32, 48, 3


def tiles(panel: np.ndarray, row: int, row_h: int, width: int) -> list[np.ndarray]:
    y = HEADER + row * (row_h + GAP)
    return [panel[y : y + row_h, i * (width + GAP) : i * (width + GAP) + width] for i in range(4)]


def colours(arr: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in c) for c in np.unique(arr.reshape(-1, 3), axis=0)}


def test_panel_geometry_palette_and_errors() -> None:
    spec = synthetic_spec(CLASSES)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    truth = rng.integers(0, CLASSES, (H, W)).astype(np.uint8)
    truth[:4] = spec.ignore_index
    pred = truth.copy()
    pred[10:20, 10:20] = (pred[10:20, 10:20] + 1) % CLASSES
    pred[:4] = 0
    panel = make_panel([(image, truth, pred), (image, truth, truth)], spec)

    assert panel.shape == (HEADER + 2 * H + GAP, 4 * W + 3 * GAP, 3)
    palette = {tuple(c) for c in spec.palette}
    inp, gt, pr, err = tiles(panel, 0, H, W)
    np.testing.assert_array_equal(inp, image)
    assert colours(gt) <= palette | {IGNORE_COLOR}
    assert colours(pr) <= palette
    np.testing.assert_array_equal(err, error_map(truth, pred, spec.ignore_index))
    wrong = (truth != pred) & (truth != spec.ignore_index)
    assert wrong.sum() == 100 - (truth[10:20, 10:20] == spec.ignore_index).sum()
    assert (err[wrong] == WRONG_COLOR).all() and (err[truth == spec.ignore_index] == IGNORED_COLOR).all()
    assert (err[~wrong & (truth != spec.ignore_index)] == CORRECT_COLOR).all()
    assert colours(tiles(panel, 1, H, W)[3]) == {CORRECT_COLOR, IGNORED_COLOR}

    half = make_panel([(image, truth, pred)], spec, tile_width=W // 2)  # label tiles stay in palette
    assert half.shape == (HEADER + H // 2, 4 * (W // 2) + 3 * GAP, 3)
    assert colours(tiles(half, 0, H // 2, W // 2)[2]) <= palette


def write_setup(root: Path) -> tuple[str, str]:
    """Synthetic val shards (3 classes), a config pointing at them, a random-weight checkpoint."""
    import torch
    import yaml

    from hrt_ray.data.synth import synth
    from hrt_ray.models import build_model

    val = str(root / "val")
    synth(val, split="val", num=2, size=(H, W), classes=CLASSES, seed=3)
    cfg = {"data": {"dataset": "synthetic", "train_uri": val, "val_uri": val}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    torch.save({"model": build_model("hrt_tiny_ocr", CLASSES).state_dict()}, root / "ckpt.pt")
    return str(root / "cfg.yaml"), str(root / "ckpt.pt")


@pytest.mark.slow
def test_visualize_cli_and_tensorboard_panel(tmp_path: Path, capsys) -> None:
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from hrt_ray.cli import main
    from hrt_ray.config import load_config
    from hrt_ray.infer.model import load_model
    from hrt_ray.infer.visualize import add_tensorboard_panel

    cfg_path, ckpt = write_setup(tmp_path)
    assert main(["visualize", "--config", cfg_path, "--checkpoint", ckpt, "--num", "2"]) == 0
    out = capsys.readouterr().out
    assert "val/000000: pixel accuracy" in out and "val/000001: pixel accuracy" in out
    panel = np.array(Image.open(tmp_path / "visualize.png"))
    assert panel.shape == (HEADER + 2 * H + GAP, 4 * W + 3 * GAP, 3)
    palette = {tuple(c) for c in synthetic_spec(CLASSES).palette}
    for row in range(2):
        _, gt, pr, err = tiles(panel, row, H, W)
        assert colours(gt) <= palette | {IGNORE_COLOR}
        assert colours(pr) <= palette
        assert colours(err) <= {CORRECT_COLOR, WRONG_COLOR, IGNORED_COLOR}
        same = (gt == pr).all(axis=-1)
        assert (err[same] == CORRECT_COLOR).all() and (err[~same] == WRONG_COLOR).all()

    # The training loop's panel: same picture, written to TensorBoard as val/panel.
    cfg = load_config(cfg_path)
    model = load_model(cfg, ckpt, CLASSES)
    model.train()  # the loop calls it mid-training; the model must come back in training mode
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    assert add_tensorboard_panel(writer, model, cfg, CLASSES, torch.device("cpu"), step=7, n=2)
    writer.close()
    assert model.training
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("val/panel")
    assert image.step == 7
    tb_panel = np.array(Image.open(io.BytesIO(image.encoded_image_string)))
    np.testing.assert_array_equal(tb_panel, panel)


def test_visualize_missing_checkpoint(tmp_path: Path, capsys) -> None:
    from hrt_ray.cli import main

    assert main(["visualize", "--checkpoint", str(tmp_path / "nope.pt")]) == 1
    assert "nope.pt: checkpoint not found" in capsys.readouterr().err

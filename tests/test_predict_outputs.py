"""``hrt-ray predict`` outputs that cannot drift: settings recorded, restarts checked, overlays apart.

Reproduced on main: labels written as train ids, then a rerun with ``--ids original`` into the
same folder rewrote nothing (every file "already done") and the official evaluator scored the
stale train ids; and pointing the evaluator at ``--dst`` found two predictions per image, because
overlays had the labels' names.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hrt_ray.data.codec import encode_png
from hrt_ray.data.synth import draw_scene
from hrt_ray.infer.predict import (
    LABELS_DIR,
    SETTINGS_FILE,
    PredictError,
    claim_destination,
    overlay_name,
    run_settings,
)

# Three classes whose original ids are 10/20/30 (like Cityscapes labelIds -> trainIds).
SPEC = {
    "name": "tri",
    "class_names": ["sky", "road", "car"],
    "palette": [[250, 10, 10], [10, 250, 10], [10, 10, 250]],
    "label_mapping": {10: 0, 20: 1, 30: 2},
}
#: Cityscapes-style names: what the official evaluator looks up.
FRAMES = [("aachen", "000000", "000019"), ("aachen", "000001", "000019"), ("bochum", "000000", "000313")]


def _setup(root: Path, seed: int = 0) -> tuple[str, str]:
    import torch
    import yaml

    from hrt_ray.models import build_model

    (root / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    cfg = {"data": {"dataset": str(root / "spec.yaml")}, "model": {"arch": "hrt_tiny_ocr"}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(seed)
    torch.save({"model": build_model("hrt_tiny_ocr", 3).state_dict()}, root / f"ckpt{seed}.pt")
    return str(root / "cfg.yaml"), str(root / f"ckpt{seed}.pt")


def _images(src: Path) -> None:
    for i, (city, seq, frame) in enumerate(FRAMES):
        path = src / city / f"{city}_{seq}_{frame}_leftImg8bit.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(draw_scene(0, "predict", i, 32, 48, 3)[0]))


def evaluator_predictions(prediction_path: Path) -> dict[tuple[str, str, str], list[str]]:
    """The lookup of cityscapesscripts' ``evalPixelLevelSemanticLabeling.getPrediction``.

    It walks the whole prediction folder and takes every file matching
    ``{city}_{sequenceNb}_{frameNb}*.png``; more than one is "Found multiple predictions".
    """
    walk = [(root, files) for root, _, files in os.walk(prediction_path)]
    out = {}
    for city, seq, frame in FRAMES:
        pattern = f"{city}_{seq}_{frame}*.png"
        out[(city, seq, frame)] = [
            os.path.join(r, f) for r, files in walk for f in fnmatch.filter(files, pattern)
        ]
    return out


def test_overlays_never_take_a_labels_name() -> None:
    assert overlay_name("aachen/aachen_000000_000019_leftImg8bit.jpg") == (
        "aachen/overlay_aachen_000000_000019_leftImg8bit.png"
    )
    assert overlay_name("a.png") == "overlay_a.png"


def test_restart_checks_the_recorded_settings(tmp_path: Path) -> None:
    from hrt_ray import storage
    from hrt_ray.config import load_config
    from hrt_ray.data.pipeline import resolve_spec

    cfg_path, ckpt0 = _setup(tmp_path, 0)
    _, ckpt1 = _setup(tmp_path, 1)  # same architecture and size, other weights
    cfg = load_config(cfg_path)
    spec = resolve_spec(cfg)
    dst = str(tmp_path / "out")
    first = run_settings(cfg, ckpt0, spec, 3, "train")
    claim_destination(dst, first, overwrite=False, endpoint=None)
    assert json.loads((tmp_path / "out" / SETTINGS_FILE).read_text()) == first
    storage.write_bytes(f"{dst}/{LABELS_DIR}/aachen/a.png", b"label")
    claim_destination(dst, first, overwrite=False, endpoint=None)  # same settings: resume
    assert (tmp_path / "out" / LABELS_DIR / "aachen" / "a.png").exists()

    with pytest.raises(PredictError, match=r"ids: 'train' -> 'original'"):
        claim_destination(dst, run_settings(cfg, ckpt0, spec, 3, "original"), overwrite=False, endpoint=None)
    with pytest.raises(PredictError, match=r"checkpoint_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        claim_destination(dst, run_settings(cfg, ckpt1, spec, 3, "train"), overwrite=False, endpoint=None)
    flip = run_settings(
        load_config(cfg_path, ["eval.flip=true", "eval.scales=[0.5,1.0]"]), ckpt0, spec, 3, "train"
    )
    with pytest.raises(PredictError) as err:
        claim_destination(dst, flip, overwrite=False, endpoint=None)
    assert "eval_scales: [1.0] -> [0.5, 1.0]" in str(err.value) and "eval_flip: False -> True" in str(
        err.value
    )
    # The same checkpoint bytes under another path are the same checkpoint.
    copy = tmp_path / "copy.pt"
    copy.write_bytes(Path(ckpt0).read_bytes())
    claim_destination(dst, run_settings(cfg, str(copy), spec, 3, "train"), overwrite=False, endpoint=None)

    other = run_settings(cfg, ckpt0, spec, 3, "original")
    claim_destination(dst, other, overwrite=True, endpoint=None)  # told to: old outputs go first
    assert not (tmp_path / "out" / LABELS_DIR).exists()
    assert json.loads((tmp_path / "out" / SETTINGS_FILE).read_text())["ids"] == "original"

    # Outputs with no record of what wrote them (main's folders) are not resumed either.
    storage.write_bytes(str(tmp_path / "old" / LABELS_DIR / "a.png"), b"label")
    with pytest.raises(PredictError, match=r"does not exist, so nothing says which checkpoint"):
        claim_destination(str(tmp_path / "old"), first, overwrite=False, endpoint=None)


@pytest.mark.slow
def test_rerun_with_other_ids_refuses_then_overwrites_and_dst_passes_the_evaluator_lookup(
    ray_session, tmp_path: Path, capsys
) -> None:
    from hrt_ray.cli import main

    cfg_path, ckpt = _setup(tmp_path)
    src, dst = tmp_path / "leftImg8bit", tmp_path / "pred"
    _images(src)
    base = ["predict", "--config", cfg_path, "--checkpoint", ckpt, "--src", str(src), "--dst", str(dst)]

    assert main([*base, "--overlay"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    # Handing --dst (labels + overlays + JSON) to the evaluator finds exactly one prediction each.
    found = evaluator_predictions(dst)
    assert all(len(v) == 1 and f"/{LABELS_DIR}/" in v[0] for v in found.values()), found
    train_ids = {k: np.array(Image.open(v[0])) for k, v in found.items()}
    assert all(set(np.unique(a)) <= {0, 1, 2} for a in train_ids.values())

    # Same settings: a restart resumes and rewrites nothing.
    assert main([*base, "--overlay"]) == 0
    assert "wrote 0 images, skipped 3 already done" in capsys.readouterr().out

    # Other ids into the same folder: refused, naming the difference; nothing rewritten.
    assert main([*base, "--ids", "original"]) == 1
    err = capsys.readouterr().err
    assert "ids: 'train' -> 'original'" in err and "--overwrite" in err
    assert all(np.array_equal(np.array(Image.open(v[0])), train_ids[k]) for k, v in found.items())

    assert main([*base, "--ids", "original", "--overwrite"]) == 0
    assert "wrote 3 images, skipped 0 already done" in capsys.readouterr().out
    found = evaluator_predictions(dst)
    assert all(len(v) == 1 for v in found.values()), found  # the old overlays went too
    for key, (path,) in found.items():
        labels = np.array(Image.open(io.BytesIO(Path(path).read_bytes())))
        np.testing.assert_array_equal(labels, (train_ids[key].astype(np.int16) + 1) * 10)
    assert json.loads((dst / SETTINGS_FILE).read_text())["ids"] == "original"

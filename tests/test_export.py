"""``hrt-ray export``: TorchScript and ONNX files that reproduce the eager model's logits.

The export command checks itself; these tests check independently, from the written files:
load them with their own runtime (``torch.jit.load``, ``onnxruntime``), run an input the export
did not use, and compare with the eager model loaded from the same checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

CLASSES = 3
SIZE = (32, 64)


def write_checkpoint(root: Path) -> str:
    import torch

    from hrt_ray.models import build_model

    torch.manual_seed(1)
    torch.save({"model": build_model("hrt_tiny_ocr", CLASSES).state_dict()}, root / "ckpt.pt")
    return str(root / "ckpt.pt")


def eager_logits(ckpt: str, x) -> np.ndarray:
    import torch

    from hrt_ray.models import build_model, load_checkpoint

    model = build_model("hrt_tiny_ocr", CLASSES)
    load_checkpoint(model, ckpt)
    with torch.no_grad():
        return model.eval()(x)["out"].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_eager(fmt: str, tmp_path: Path, capsys) -> None:
    import torch

    from hrt_ray.cli import main

    ckpt = write_checkpoint(tmp_path)
    argv = ["export", "--checkpoint", ckpt, "--format", fmt, "--size", "32x64"]
    argv += ["model.num_classes=3", "data.synth.classes=3"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "argmax agreement" in capsys.readouterr().out
    path = tmp_path / f"model-32x64.{'ts' if fmt == 'torchscript' else 'onnx'}"
    meta = json.loads(Path(f"{path}.json").read_text())
    assert meta["input"]["shape"] == [1, 3, *SIZE] and meta["output"]["shape"] == [1, CLASSES, *SIZE]
    assert meta["preprocess"]["channel_order"] == "RGB" and len(meta["preprocess"]["mean"]) == 3

    x = torch.from_numpy(np.random.default_rng(5).normal(size=(1, 3, *SIZE)).astype(np.float32))
    ref = eager_logits(ckpt, x)
    if fmt == "torchscript":
        got = torch.jit.load(str(path))(x).detach().numpy()
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": x.numpy()})[0]
    assert got.shape == (1, CLASSES, *SIZE)
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-3)
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.999


def test_export_errors(tmp_path: Path, capsys) -> None:
    from hrt_ray.cli import main

    assert main(["export", "--checkpoint", str(tmp_path / "gone.pt"), "--format", "onnx"]) == 1
    assert "gone.pt: checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", "x.pt", "--format", "onnx", "--size", "32by64"])
    assert "expected HxW such as 512x1024" in capsys.readouterr().err

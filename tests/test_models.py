"""The HRT + OCR models: shapes, official layout, official outputs, checkpoints, gradients, attention."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference_weights import reference_state_dict

from hrt_ray import storage
from hrt_ray.models import build_model, list_models, load_checkpoint
from hrt_ray.models.attention import LocalWindowAttention, WindowMultiheadAttention
from hrt_ray.models.checkpoint import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures"
MANIFEST = json.loads((FIXTURES / "hrt_ocr_v2_state_dict_keys.json").read_text())
# our name -> official manifest name
OFFICIAL = {
    "hrt_small_ocr": "hrt_small_ocr_v2",
    "hrt_base_ocr": "hrt_base_ocr_v2",
    "hrt_base_w13_ocr": "hrt_base_w13_ocr_v2",
    "hrt_base_w15_ocr": "hrt_base_w15_ocr_v2",
}
# Published parameter counts (shared/README.md): classes -> count, plus the backbone alone.
PARAMS = {
    "hrt_small_ocr": ({59: 13_564_896, 150: 13_658_262, 171: 13_679_808}, 7_891_050),
    "hrt_base_ocr": ({59: 56_073_552, 150: 56_166_918, 171: 56_188_464}, 44_040_666),
    "hrt_base_w13_ocr": ({59: 56_184_816}, 44_151_930),
    "hrt_base_w15_ocr": ({171: 56_352_432}, 44_204_634),
}


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _save(obj: object, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


# --------------------------------------------------------------------------------------------------
# Architecture and official layout
# --------------------------------------------------------------------------------------------------


SHAPE_CASES = [(name, (61, 77)) for name in list_models()] + [
    ("hrt_tiny_ocr", (64, 96)),
    ("hrt_small_ocr", (64, 96)),
]


@pytest.mark.parametrize(("name", "size"), SHAPE_CASES, ids=[f"{n}-{h}x{w}" for n, (h, w) in SHAPE_CASES])
def test_output_shapes_every_architecture(name: str, size: tuple[int, int]) -> None:
    """61x77 is divisible by neither the windows nor 32; 64x96 is divisible by 32 (not by 7)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert set(out) == {"out", "aux"}
    for key in ("out", "aux"):
        assert out[key].shape == (1, 5, *size), key
        assert torch.isfinite(out[key]).all(), key


@pytest.mark.parametrize("window", [1, 4, 9, 20])
def test_any_positive_window_size_works(window: int) -> None:
    model = build_model("hrt_tiny_ocr", num_classes=3, window_size=window).eval()
    attn = model.backbone.stage2[0].branches[0][0].attn.attn
    assert attn.relative_position_bias_table.shape == ((2 * window - 1) ** 2, 1)
    assert attn.relative_position_index.shape == (window**2, window**2)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 37, 45))
    assert out["out"].shape == (2, 3, 37, 45)
    assert torch.isfinite(out["out"]).all()


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_state_dict_matches_official_manifest(name: str) -> None:
    ref = MANIFEST[OFFICIAL[name]]
    model = build_model(name, num_classes=ref["num_classes"])
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert len(ours) == len(ref["state_dict"])
    for mine, official in zip(ours, ref["state_dict"], strict=True):
        assert mine == official
    assert _num_params(model) == ref["num_parameters"]


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_for_other_class_counts(name: str) -> None:
    by_classes, backbone = PARAMS[name]
    for classes, expected in by_classes.items():
        model = build_model(name, num_classes=classes)
        assert _num_params(model) == expected, classes
        assert _num_params(model.backbone) == backbone


def test_backbone_returns_four_branches_at_strides_4_to_32() -> None:
    model = build_model("hrt_tiny_ocr", num_classes=2).eval()
    with torch.no_grad():
        xs = model.backbone(torch.randn(1, 3, 128, 96))
    assert [tuple(x.shape[1:]) for x in xs] == [(18, 32, 24), (36, 16, 12), (72, 8, 6), (144, 4, 3)]


def test_drop_path_schedule_is_linear_over_blocks_shared_by_branches() -> None:
    backbone = build_model("hrt_small_ocr", num_classes=2).backbone
    rates = []
    for stage in (backbone.stage2, backbone.stage3, backbone.stage4):
        for module in stage:
            per_branch = [
                [getattr(b.drop_path, "drop_prob", 0.0) for b in branch] for branch in module.branches
            ]
            assert all(r == per_branch[0] for r in per_branch)  # every branch shares its module's slice
            rates.extend(per_branch[0])
    expected = torch.linspace(0, 0.2, 14).tolist()  # (1 + 4 + 2) modules x 2 blocks
    assert rates == pytest.approx(expected)
    assert (
        build_model("hrt_small_ocr", 2, drop_path_rate=0.0)
        .backbone.stage4[1]
        .branches[0][1]
        .drop_path.__class__.__name__
        == "Identity"
    )


@pytest.mark.parametrize("name", ["hrt_small_ocr", "hrt_base_w15_ocr"])
def test_outputs_equal_the_official_implementation(name: str) -> None:
    """The fixture holds the official model's outputs for the same generated weights and input."""
    expected = torch.load(FIXTURES / "official_outputs.pt", weights_only=True)[name]
    model = build_model(name, num_classes=19).eval()
    model.load_state_dict(reference_state_dict(model.state_dict()), strict=True)
    with torch.no_grad():
        out = model(expected["images"])
    for key in ("out", "aux"):
        scale = expected[key].abs().max()
        assert scale > 1.0  # the weights keep activations non-trivial
        diff = (out[key] - expected[key]).abs().max()
        assert diff <= 1e-4 * scale, f"{key}: max |diff| {diff:.3g} vs max |official| {scale:.3g}"


def test_training_step_equals_the_official_implementation() -> None:
    """Training mode (batch-statistics BN, running-statistics updates, backward through the
    factorised head, the channels-last blocks and the recomputing BN+GELU) against the official
    model's outputs, gradients and updated running statistics for the same weights, input and
    loss, all in float64 (in float32 both sides' gradients carry ~1e-3 relative rounding noise
    from the batch-statistics BNs, too loose to tell a real difference). Drop path and dropout
    are off on both sides (random)."""
    expected = torch.load(FIXTURES / "official_outputs.pt", weights_only=True)["hrt_small_ocr_train"]
    model = build_model("hrt_small_ocr", num_classes=19, drop_path_rate=0.0)
    model.load_state_dict(reference_state_dict(model.state_dict()), strict=True)
    model.ocr_distri_head.conv_bn_dropout[2].p = 0.0
    model.double().train()
    out = model(expected["images"])
    (out["out"].square().mean() + 0.4 * out["aux"].square().mean()).backward()
    for key in ("out", "aux"):
        torch.testing.assert_close(out[key].float(), expected[key], rtol=1e-5, atol=1e-6, msg=key)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    for key, want in expected["grads"].items():
        got = params[key].grad[: want.shape[0]].float()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item(), msg=key)
    # Every parameter's gradient, through its norm (biases right before a training-mode BN have
    # a gradient that is zero up to rounding: compared on the largest norm's scale).
    norms = expected["grad_norms"]
    assert set(norms) == set(params)
    largest = max(n.item() for n in norms.values())
    for key, want in norms.items():
        torch.testing.assert_close(params[key].grad.norm(), want, rtol=1e-6, atol=1e-9 * largest, msg=key)
    for key, want in expected["running"].items():
        torch.testing.assert_close(buffers[key].float(), want, rtol=1e-5, atol=1e-7, msg=key)


# --------------------------------------------------------------------------------------------------
# Speed options keep the arithmetic
# --------------------------------------------------------------------------------------------------


def _tiny_pair(**options: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    plain = build_model("hrt_tiny_ocr", num_classes=4)
    plain.load_state_dict(reference_state_dict(plain.state_dict()))
    other = build_model("hrt_tiny_ocr", num_classes=4, **options)
    other.load_state_dict(plain.state_dict())
    return plain, other


def test_channels_last_gives_the_same_outputs() -> None:
    plain, fast = _tiny_pair(channels_last=True)
    x = torch.randn(1, 3, 61, 77)
    with torch.no_grad():
        a, b = plain.eval()(x), fast.eval()(x)
    torch.testing.assert_close(b["out"], a["out"], rtol=1e-4, atol=1e-4 * a["out"].abs().max().item())


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    plain, ckpt = _tiny_pair(activation_checkpointing=True)
    x = torch.randn(2, 3, 48, 64)
    grads = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(0)  # the same Dropout2d mask in the OCR head
        out = model(x)
        (out["out"].square().mean() + 0.4 * out["aux"].square().mean()).backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for key, g in grads[0].items():
        # biases right before a training-mode BN have ~0 gradient: compare on the model's grad scale
        torch.testing.assert_close(grads[1][key], g, rtol=1e-3, atol=1e-6, msg=key)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = build_model("hrt_tiny_ocr", num_classes=4).train()
    images = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 4, (2, 64, 64))
    out = model(images)
    loss = F.cross_entropy(out["out"], target) + 0.4 * F.cross_entropy(out["aux"], target)
    loss.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, f"no gradient for {silent[:10]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Attention fast path
# --------------------------------------------------------------------------------------------------


def _reference_attention(attn: WindowMultiheadAttention, windows: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + B) V per head with the module's own weights, written out plainly."""
    n, c, h = windows.shape[1], windows.shape[2], attn.num_heads
    d = c // h
    q = attn.q_proj(windows).view(-1, n, h, d).transpose(1, 2)
    k = attn.k_proj(windows).view(-1, n, h, d).transpose(1, 2)
    v = attn.v_proj(windows).view(-1, n, h, d).transpose(1, 2)
    ws = attn.window_size
    bias = torch.empty(h, n, n)
    for i in range(n):  # the bias of query i and key j depends on their offset (dy, dx) only
        for j in range(n):
            dy = i // ws - j // ws + ws - 1
            dx = i % ws - j % ws + ws - 1
            bias[:, i, j] = attn.relative_position_bias_table[dy * (2 * ws - 1) + dx]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d) + bias
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c)
    return attn.out_proj(out)


@pytest.mark.parametrize(("dim", "heads", "window"), [(32, 1, 7), (48, 4, 5), (24, 2, 1)])
def test_window_attention_equals_plain_softmax_reference(dim: int, heads: int, window: int) -> None:
    torch.manual_seed(0)
    attn = WindowMultiheadAttention(dim, heads, window).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0, 1.0)
        windows = torch.randn(6, window * window, dim)
        torch.testing.assert_close(attn(windows), _reference_attention(attn, windows), rtol=1e-5, atol=1e-5)


def test_local_window_attention_pads_and_crops_like_the_official_code() -> None:
    """Window by window with explicit loops: zero padding centred (extra row/column at the end)."""
    torch.manual_seed(0)
    ws, h, w, c = 5, 12, 9, 16
    module = LocalWindowAttention(c, 2, ws).eval()
    x = torch.randn(2, h, w, c)
    top, left = (-h % ws) // 2, (-w % ws) // 2
    padded = torch.zeros(2, h + (-h % ws), w + (-w % ws), c)
    padded[:, top : top + h, left : left + w] = x
    expected = torch.empty_like(padded)
    with torch.no_grad():
        for b in range(2):
            for y0 in range(0, padded.shape[1], ws):
                for x0 in range(0, padded.shape[2], ws):
                    win = padded[b, y0 : y0 + ws, x0 : x0 + ws].reshape(1, ws * ws, c)
                    expected[b, y0 : y0 + ws, x0 : x0 + ws] = _reference_attention(module.attn, win).view(
                        ws, ws, c
                    )
        got = module(x)
    torch.testing.assert_close(got, expected[:, top : top + h, left : left + w], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_weights() -> dict[str, torch.Tensor]:
    """Official-layout weights for HRT-S + OCR (19 classes), checked against the manifest."""
    template = build_model("hrt_small_ocr", 19).state_dict()
    assert [[k, list(v.shape)] for k, v in template.items()] == [
        e[:2] for e in MANIFEST["hrt_small_ocr_v2"]["state_dict"]
    ]
    return reference_state_dict(template)


@pytest.mark.parametrize(
    "layout",
    ["raw", "module-prefix", "state_dict", "state_dict+module-prefix", "ours"],
)
def test_official_segmentation_checkpoint_loads_strictly(
    layout: str, small_weights: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    weights = small_weights
    if "module-prefix" in layout:
        weights = {f"module.{k}": v for k, v in weights.items()}
    obj: object = weights
    if layout.startswith("state_dict"):
        obj = {"state_dict": weights, "epoch": 3}
    elif layout == "ours":
        obj = {"model": weights, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3}
    model = build_model("hrt_small_ocr", 19)
    report = load_checkpoint(model, _save(obj, tmp_path / "ckpt.pth"))
    assert report.layout == "model"
    assert report.loaded == len(small_weights)
    assert not report.missing and not report.unexpected
    for key, value in model.state_dict().items():
        assert torch.equal(value, small_weights[key]), key


def test_checkpoint_loads_from_s3(s3_bucket: str) -> None:
    source = build_model("hrt_tiny_ocr", 3)
    weights = reference_state_dict(source.state_dict())
    buffer = io.BytesIO()
    torch.save({"model": weights}, buffer)
    uri = f"{s3_bucket}/runs/a/checkpoint.pt"
    storage.write_bytes(uri, buffer.getvalue())
    model = build_model("hrt_tiny_ocr", 3)
    report = load_checkpoint(model, uri)
    assert report.uri == uri and report.loaded == len(weights)
    assert torch.equal(model.cls_head.weight, weights["cls_head.weight"])


def _imagenet_checkpoint(backbone_state: dict[str, torch.Tensor]) -> dict[str, object]:
    """Official ``cls/`` layout: backbone keys without prefix plus the classification head."""
    head = {
        "incre_modules.0.0.conv1.weight": torch.randn(32, 18, 1, 1),
        "downsamp_modules.0.0.weight": torch.randn(128, 1, 3, 3),
        "final_layer.0.weight": torch.randn(2048, 1024, 1, 1),
        "classifier.weight": torch.randn(1000, 2048),
        "classifier.bias": torch.randn(1000),
    }
    return {"model": {**backbone_state, **head}, "optimizer": {}, "epoch": 299}


def test_imagenet_backbone_checkpoint_fills_the_backbone_only(tmp_path: Path) -> None:
    backbone_weights = reference_state_dict(build_model("hrt_tiny_ocr", 2).backbone.state_dict())
    path = _save(_imagenet_checkpoint(backbone_weights), tmp_path / "imagenet.pth")
    model = build_model("hrt_tiny_ocr", 2)
    head_before = model.cls_head.weight.clone()
    report = load_checkpoint(model, path)
    assert report.layout == "backbone"
    assert sorted(report.dropped) == sorted(k for k in _imagenet_checkpoint({})["model"])
    assert not report.missing and not report.unexpected and not report.resized
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_weights[key]), key
    assert torch.equal(model.cls_head.weight, head_before)
    assert "dropped (ImageNet head)" in str(report)


def test_imagenet_backbone_with_another_window_resizes_the_bias_tables(tmp_path: Path) -> None:
    backbone_weights = reference_state_dict(build_model("hrt_tiny_ocr", 2).backbone.state_dict())  # window 7
    path = _save(_imagenet_checkpoint(backbone_weights), tmp_path / "imagenet_w7.pth")
    model = build_model("hrt_tiny_ocr", 2, window_size=11)
    own_index = model.backbone.stage2[0].branches[0][0].attn.attn.relative_position_index.clone()
    report = load_checkpoint(model, path)
    tables = [k for k in backbone_weights if k.endswith("relative_position_bias_table")]
    assert sorted(report.resized) == sorted(tables)
    attn = model.backbone.stage2[0].branches[0][0].attn.attn
    assert attn.relative_position_bias_table.shape == (21 * 21, 1)
    assert torch.equal(attn.relative_position_index, own_index)
    # bilinear resize of a (13x13 -> 21x21) grid keeps the centre value (offset 0, 0)
    src = backbone_weights["stage2.0.branches.0.0.attn.attn.relative_position_bias_table"].view(13, 13)
    assert attn.relative_position_bias_table.view(21, 21)[10, 10].item() == pytest.approx(src[6, 6].item())


def test_checkpoint_with_wrong_shapes_names_key_and_both_shapes(tmp_path: Path) -> None:
    weights = build_model("hrt_tiny_ocr", 19).state_dict()
    path = _save({"state_dict": weights}, tmp_path / "city.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(build_model("hrt_tiny_ocr", 59), path)
    message = str(err.value)
    assert path in message
    assert "cls_head.weight: checkpoint (19, 512, 1, 1) vs model (59, 512, 1, 1)" in message


def test_checkpoint_of_another_model_reports_missing_and_unexpected_keys(tmp_path: Path) -> None:
    weights = build_model("hrt_tiny_ocr", 3).state_dict()
    weights.pop("cls_head.bias")
    weights["backbone.extra.weight"] = torch.zeros(1)
    path = _save(weights, tmp_path / "odd.pth")
    with pytest.raises(
        CheckpointError, match=r"missing \['cls_head.bias'\].*unexpected \['backbone.extra.weight'\]"
    ):
        load_checkpoint(build_model("hrt_tiny_ocr", 3), path)
    report = load_checkpoint(build_model("hrt_tiny_ocr", 3), path, strict=False)
    assert report.missing == ["cls_head.bias"] and report.unexpected == ["backbone.extra.weight"]


def test_unreadable_checkpoints_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_checkpoint(build_model("hrt_tiny_ocr", 2), str(garbage))
    no_tensors = _save({"epoch": 1, "note": "no weights"}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="empty.pth: no state_dict found"):
        load_checkpoint(build_model("hrt_tiny_ocr", 2), no_tensors)
    with pytest.raises(storage.StorageError):
        load_checkpoint(build_model("hrt_tiny_ocr", 2), str(tmp_path / "absent.pth"))


def test_checkpoints_are_loaded_without_running_code(tmp_path: Path) -> None:
    """``weights_only=True``: a pickle that would call a function is refused, not executed."""
    path = tmp_path / "evil.pth"
    torch.save({"model": build_model("hrt_tiny_ocr", 2).state_dict(), "hook": _save}, path)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_checkpoint(build_model("hrt_tiny_ocr", 2), str(path))


# --------------------------------------------------------------------------------------------------
# Errors from the builder
# --------------------------------------------------------------------------------------------------


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'hrt_large_ocr'") as err:
        build_model("hrt_large_ocr", 19)
    for name in list_models():
        assert name in str(err.value)


@pytest.mark.parametrize("window", [0, -3])
def test_non_positive_window_size_is_refused(window: int) -> None:
    with pytest.raises(ValueError, match="window_size must be a positive integer"):
        build_model("hrt_tiny_ocr", 2, window_size=window)

"""Loss, optimiser grouping, LR schedule, checkpoint state and watchdog: no Ray needed."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hrt_ray.train.loss import ohem_cross_entropy, segmentation_loss
from hrt_ray.train.optim import build_optimizer, build_scheduler, no_decay_names, warmup_poly_factor
from hrt_ray.train.state import CHECKPOINT_FILE, load_state, save_state
from hrt_ray.train.watchdog import StallError, iter_with_timeout


def reference_ohem(logits, target, thresh, min_kept, ignore=255, weight=None):
    """The official FSOhemCELoss algorithm, with a full sort."""
    prob = F.softmax(logits, 1)
    tmp = target.clone()
    tmp[tmp == ignore] = 0
    p = prob.gather(1, tmp.unsqueeze(1)).reshape(-1)
    mask = target.reshape(-1) != ignore
    sort_prob, sort_idx = p[mask].sort()
    min_threshold = sort_prob[min(max(1, min_kept), sort_prob.numel() - 1)]
    threshold = max(float(min_threshold), thresh)
    loss = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore, reduction="none").reshape(-1)
    return loss[mask][sort_idx][sort_prob < threshold].mean()


@pytest.mark.parametrize("thresh,min_kept", [(0.7, 100), (0.7, 5000), (0.3, 10), (0.99, 1), (0.5, 100000)])
def test_ohem_matches_the_sorting_reference(thresh: float, min_kept: int) -> None:
    g = torch.Generator().manual_seed(int(thresh * 100) + min_kept)
    logits = torch.randn(2, 5, 24, 32, generator=g) * 3
    target = torch.randint(0, 5, (2, 24, 32), generator=g)
    target[:, :4] = 255
    weight = torch.rand(5, generator=g) + 0.5
    for w in (None, weight):
        ours = ohem_cross_entropy(logits, target, thresh, min_kept, weight=w)
        ref = reference_ohem(logits, target, thresh, min_kept, weight=w)
        assert torch.allclose(ours, ref, atol=1e-5), (ours, ref)


def test_ohem_gradients_and_edge_cases() -> None:
    logits = torch.randn(1, 3, 8, 8, requires_grad=True)
    target = torch.full((1, 8, 8), 255)
    loss = ohem_cross_entropy(logits, target)
    assert float(loss.detach()) == 0.0
    loss.backward()  # all ignored: zero loss, still differentiable
    target[0, 0, 0] = 1
    one = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=100)
    assert torch.allclose(one, F.cross_entropy(logits[:, :, :1, :1], target[:, :1, :1]))
    # Confident correct pixels above thresh are dropped unless needed to reach min_kept.
    easy = torch.zeros(1, 2, 1, 4)
    easy[0, 0] = torch.tensor([10.0, 10.0, 10.0, -10.0])
    t = torch.zeros(1, 1, 4, dtype=torch.long)
    assert torch.allclose(ohem_cross_entropy(easy, t, 0.7, 1), F.cross_entropy(easy[..., 3:], t[..., 3:]))


def test_segmentation_loss_adds_weighted_aux_in_fp32() -> None:
    out = torch.randn(2, 4, 8, 8).bfloat16()
    aux = torch.randn(2, 4, 8, 8).bfloat16()
    target = torch.randint(0, 4, (2, 8, 8))
    total, parts = segmentation_loss({"out": out, "aux": aux}, target, ohem=False, aux_weight=0.4)
    assert total.dtype == torch.float32
    expected = F.cross_entropy(out.float(), target) + 0.4 * F.cross_entropy(aux.float(), target)
    assert torch.allclose(total, expected, atol=1e-5)
    assert set(parts) == {"loss_main", "loss_aux"}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.ln = nn.LayerNorm(8)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.head = nn.Linear(8, 4, bias=False)


def test_no_weight_decay_on_norms_biases_and_position_tables() -> None:
    model = Tiny()
    assert no_decay_names(model) == {
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "ln.weight",
        "ln.bias",
        "relative_position_bias_table",
    }
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.01)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.conv.weight), id(model.head.weight)}
    assert isinstance(opt, torch.optim.AdamW)


def test_warmup_then_poly_schedule() -> None:
    max_iters, warmup = 1000, 100
    assert warmup_poly_factor(0, max_iters, warmup, 1e-6) == pytest.approx(1e-6)
    assert warmup_poly_factor(50, max_iters, warmup, 1e-6) == pytest.approx(0.5, abs=1e-6)
    assert warmup_poly_factor(100, max_iters, warmup) == pytest.approx(1.0)
    assert warmup_poly_factor(550, max_iters, warmup) == pytest.approx(0.5**0.9)
    assert warmup_poly_factor(1000, max_iters, warmup) == 0.0
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = build_scheduler(opt, max_iters, warmup, 1e-6, 0.9)
    lrs = []
    for _ in range(300):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-10) and lrs[100] == pytest.approx(1e-4)
    assert all(a < b for a, b in zip(lrs[:100], lrs[1:101], strict=True))
    assert all(a > b for a, b in zip(lrs[100:-1], lrs[101:], strict=True))
    # The scheduler's state restores the exact position (resume continues at the same LR).
    state = sched.state_dict()
    opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched2 = build_scheduler(opt2, max_iters, warmup, 1e-6, 0.9)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 300
    assert sched2.get_last_lr()[0] == pytest.approx(1e-4 * warmup_poly_factor(300, max_iters, warmup))


def test_state_is_atomic_and_weights_only(tmp_path: Path) -> None:
    from hrt_ray.train.state import rng_state

    state = {"model": {"w": torch.ones(3)}, "iteration": 7, "rng": [rng_state()], "best": None}
    path = save_state(tmp_path, state)
    assert path.name == CHECKPOINT_FILE
    # The state and its completeness manifest, written last; no temp file left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_FILE, "hrt-checkpoint.json"])
    loaded = load_state(tmp_path)
    assert loaded["iteration"] == 7 and torch.equal(loaded["model"]["w"], torch.ones(3))
    # A pickled object is refused by the weights_only loader.
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"obj": threading.Lock.__name__, "fn": math.floor}, bad / CHECKPOINT_FILE)
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        load_state(bad)


def test_watchdog_names_the_stage_of_a_stall() -> None:
    def slow():
        yield 1
        time.sleep(5)
        yield 2

    it = iter_with_timeout(slow(), 0.3, stage="training data (rank 1, epoch 3)")
    assert next(it) == 1
    start = time.monotonic()
    with pytest.raises(StallError, match=r"stalled in stage 'training data \(rank 1, epoch 3\)'"):
        next(it)
    assert time.monotonic() - start < 3
    assert list(iter_with_timeout(iter(range(5)), 1.0, "x")) == [0, 1, 2, 3, 4]

    def broken():
        yield 1
        raise ValueError("bad record")

    with pytest.raises(ValueError, match="bad record"):
        list(iter_with_timeout(broken(), 1.0, "x"))


def _summary(**kw):
    from hrt_ray.train.trainer import TrainSummary

    fields = dict(
        name="run",
        run_dir="/runs/run",
        iteration=80000,
        final_miou=0.7812,
        start_miou=None,
        best_miou=0.7812,
        checkpoint="/runs/run/checkpoint_1",
        best_checkpoint="/runs/run/checkpoint_1",
        tensorboard="/runs/run/tensorboard",
    )
    return TrainSummary(**{**fields, **kw})


def test_train_summary_holds_the_result_against_the_job_rows_target() -> None:
    """The row's published mIoU beside ours, single-scale from validation, multi-scale from eval."""
    import json

    from hrt_ray.config import load_config

    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(repo / "jobs" / "cityscapes-hrt_s_w7-80k-b8-512x1024.yaml")
    source = cfg.target.source
    assert source and cfg.target.miou_ss == 80.0 and cfg.target.miou_ms == 81.0

    plain = _summary(target=cfg.target)
    ss_line = f"target mIoU   80.00 ss ({source}) -> achieved 78.12 (-1.88)"
    lines = plain.lines()
    assert ss_line in lines and lines.index(ss_line) == 2  # right under the val mIoU line
    assert not any(" ms (" in line for line in lines)

    ms_eval = {"mIoU": 0.8234, "setting": "whole-ms0.75_1_1.25-flip", "json": "/x.json", "scales": "ms"}
    both = _summary(target=cfg.target, eval=ms_eval).lines()
    assert ss_line in both
    assert f"target mIoU   81.00 ms ({source}) -> achieved 82.34 (+1.34)" in both
    # A single-scale evaluation (flip or slide) is what the single-scale figure is held against.
    ss_eval = {"mIoU": 0.8001, "setting": "whole-ss1-flip", "json": "/x.json", "scales": "ss"}
    assert [line for line in _summary(target=cfg.target, eval=ss_eval).lines() if "target" in line] == [
        f"target mIoU   80.00 ss ({source}) -> achieved 80.01 (+0.01)"
    ]

    data = json.loads(json.dumps(_summary(target=cfg.target, eval=ms_eval).as_json()))
    assert data["target"]["miou_ss"] == 80.0 and data["target"]["source"] == source
    compared = {c["scales"]: c for c in data["target"]["compared"]}
    assert compared["ss"]["achieved_miou"] == pytest.approx(78.12)
    assert compared["ss"]["difference"] == pytest.approx(-1.88)
    assert compared["ms"]["published_miou"] == 81.0 and compared["ms"]["difference"] == pytest.approx(1.34)


def test_train_summary_without_a_target_prints_nothing_extra() -> None:
    from hrt_ray.config import load_config

    repo = Path(__file__).resolve().parent.parent
    no_figures = load_config(repo / "jobs" / "ade20k-hrt_b_w15-150k-b8-520x520.yaml").target
    default = load_config(repo / "jobs" / "default.yaml").target
    reference = _summary().lines()
    for target in (None, no_figures, default):
        summary = _summary(target=target)
        assert summary.lines() == reference
        assert summary.as_json()["target"] is None
    # Nothing measured yet: no comparison line either.
    cityscapes = load_config(repo / "jobs" / "cityscapes-hrt_s_w7-80k-b8-512x1024.yaml").target
    assert not any("target" in line for line in _summary(target=cityscapes, final_miou=None).lines())

"""Experiment config: errors name the key path before anything starts; every job file validates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hrt_ray.config import ConfigError, from_dict, load_config, to_dict

REPO = Path(__file__).resolve().parent.parent
JOBS = sorted(p for p in (REPO / "jobs").glob("*.yaml") if p.name != "runtime_env.yaml")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  learning_rate: 1e-3\n  wieght_decay: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "optim.learning_rate: unknown key" in msg
    assert "Allowed:" in msg and "weight_decay" in msg
    with pytest.raises(ConfigError, match=r"optim\.wieght_decay: unknown key; did you mean 'weight_decay'"):
        load_config(write(tmp_path, "optim:\n  wieght_decay: 0.1\n"))


def test_wrong_type_and_impossible_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"scaling\.num_workers: expected an integer, got 'two'"):
        load_config(write(tmp_path, "scaling:\n  num_workers: two\n"))
    with pytest.raises(ConfigError, match=r"optim\.lr: must be > 0"):
        load_config(None, ["optim.lr=-1"])
    with pytest.raises(
        ConfigError, match=r"optim\.amp: 'fp8' is not allowed; choose one of 'bf16', 'fp16', 'off'"
    ):
        load_config(None, ["optim.amp=fp8"])
    with pytest.raises(
        ConfigError, match=r"data\.batch_size: 9 does not split evenly over scaling\.num_workers=2"
    ):
        load_config(None, ["data.batch_size=9"])
    with pytest.raises(ConfigError, match=r"eval\.batch_size: must be >= 1"):
        load_config(None, ["eval.batch_size=0"])
    with pytest.raises(ConfigError, match=r"target\.miou_ss: a percentage"):
        load_config(None, ["target.miou_ss=180"])


def test_overrides_are_typed_and_checked() -> None:
    cfg = load_config(None, ["optim.lr=2e-4", "scaling.num_workers=4", "eval.scales=[0.75,1.0,1.25]"])
    assert cfg.optim.lr == pytest.approx(2e-4) and cfg.scaling.num_workers == 4
    assert cfg.eval.scales == [0.75, 1.0, 1.25]
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key; did you mean 'lr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"optim\.lr\.x is not a section|optim\.lr is not a section"):
        load_config(None, ["optim.lr.x=1"])


def test_from_dict_round_trip() -> None:
    cfg = load_config(None, ["optim.lr=3e-4", "name=abc"])
    again = from_dict(json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_every_job_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem
    if path.stem == "default":
        assert cfg == load_config(None), "jobs/default.yaml must be the embedded default"
        return
    assert cfg.target.source and "HRFormer" in cfg.target.source
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.optim.weight_decay == pytest.approx(0.01)
    assert cfg.eval.scales == [0.75, 1.0, 1.25] and cfg.eval.flip
    assert cfg.loss.aux_weight == pytest.approx(0.4)
    expected = {
        "cityscapes": (80000, 8, [512, 1024]),
        "pascal_context": (60000, 16, [520, 520]),
        "coco_stuff": (60000, 16, [520, 520]),
        "ade20k": (150000, 8, [520, 520]),
    }[cfg.data.dataset]
    assert (cfg.optim.max_iters, cfg.data.batch_size, cfg.data.crop_size) == expected
    if "w15" not in path.stem or cfg.data.dataset != "ade20k":
        assert cfg.target.miou_ss is not None and cfg.target.miou_ms is not None
        assert cfg.target.miou_ms >= cfg.target.miou_ss


def test_job_rows_cover_the_published_tables() -> None:
    rows = {(load_config(p).data.dataset, load_config(p).model.arch) for p in JOBS if p.stem != "default"}
    assert len(rows) == 13
    for ds in ("cityscapes", "pascal_context", "coco_stuff"):
        assert {a for d, a in rows if d == ds} == {"hrt_small_ocr", "hrt_base_ocr", "hrt_base_w15_ocr"}
    assert {a for d, a in rows if d == "ade20k"} == {
        "hrt_small_ocr",
        "hrt_base_ocr",
        "hrt_base_w13_ocr",
        "hrt_base_w15_ocr",
    }


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hrt_ray", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_config_show_prints_the_resolved_config() -> None:
    out = _cli("config", "show", "jobs/default.yaml", "optim.lr=2e-4", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["optim"]["lr"] == pytest.approx(2e-4) and data["model"]["arch"] == "hrt_tiny_ocr"
    yaml_out = _cli("config", "show", "jobs/default.yaml")
    assert yaml_out.returncode == 0 and "arch: hrt_tiny_ocr" in yaml_out.stdout
    bad = _cli("config", "show", "jobs/default.yaml", "scaling.num_wrokers=3")
    assert bad.returncode == 2
    assert "scaling.num_wrokers: unknown key; did you mean 'num_workers'" in bad.stderr
    # A config typo is reported by `train` before Ray or torch start.
    bad_train = _cli("train", "--config", "jobs/default.yaml", "optim.max_iter=3")
    assert bad_train.returncode == 2 and "did you mean 'max_iters'" in bad_train.stderr


def test_one_set_of_defaults_the_section_dataclasses_are_the_embedded_default() -> None:
    """No second layer of defaults: the experiment's sections are their dataclasses' defaults."""
    import dataclasses

    from hrt_ray.config import ExperimentConfig

    cfg = ExperimentConfig()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            assert value == type(value)(), f"ExperimentConfig.{f.name} overrides its section's defaults"


PAPER_JOBS = [p for p in JOBS if p.stem != "default"]


@pytest.mark.parametrize("path", PAPER_JOBS, ids=[p.stem for p in PAPER_JOBS])
def test_every_job_row_states_its_published_figures(path: Path) -> None:
    """The ``target:`` figures are read from the file as numbers, as percentages, and as written."""
    import yaml

    raw = yaml.safe_load(path.read_text())["target"]
    target = load_config(path).target
    assert target.source == raw["source"]
    if raw["miou_ss"] is None:  # the one row the README publishes without results
        assert path.stem.startswith("ade20k-hrt_b_w15") and raw["miou_ms"] is None
        assert target.miou_ss is None and target.miou_ms is None
        assert target.compare(0.5, "ss") is None and target.compare(0.5, "ms") is None
        return
    for key in ("miou_ss", "miou_ms"):
        value = getattr(target, key)
        assert isinstance(value, float) and 0.0 <= value <= 100.0, (key, value)
        assert value == pytest.approx(float(raw[key]))
    assert target.miou_ss <= target.miou_ms
    assert target.compare(0.5, "ss").published == target.miou_ss
    assert target.compare(0.5, "ms").published == target.miou_ms


def test_target_comparison_line_and_json() -> None:
    from hrt_ray.config import TargetConfig

    target = TargetConfig(miou_ss=80.0, miou_ms=81.5, source="paper Table 3")
    ss = target.compare(0.7812, "ss")
    assert ss.line() == "target mIoU   80.00 ss (paper Table 3) -> achieved 78.12 (-1.88)"
    assert ss.as_json() == {
        "scales": "ss",
        "published_miou": 80.0,
        "achieved_miou": pytest.approx(78.12),
        "difference": pytest.approx(-1.88),
        "source": "paper Table 3",
    }
    assert target.compare(0.8251, "ms").line() == (
        "target mIoU   81.50 ms (paper Table 3) -> achieved 82.51 (+1.01)"
    )
    # Nothing measured, or nothing published for that setting: nothing to compare.
    assert target.compare(None, "ss") is None and target.compare(float("nan"), "ss") is None
    assert TargetConfig(miou_ss=80.0).compare(0.8, "ms") is None
    assert TargetConfig().compare(0.8, "ss") is None
    assert TargetConfig(miou_ms=50.0).compare(0.5, "ms").line() == (
        "target mIoU   50.00 ms -> achieved 50.00 (+0.00)"
    )


def test_loaded_configs_are_frozen() -> None:
    """A validated config is never changed in place: changed copies come from ``replace``."""
    import dataclasses

    cfg = load_config(REPO / "jobs" / "cityscapes-hrt_s_w7-80k-b8-512x1024.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.storage.path = "/elsewhere"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.target.miou_ss = 99.0  # type: ignore[misc]
    again = from_dict(to_dict(cfg))
    with pytest.raises(dataclasses.FrozenInstanceError):
        again.optim.lr = 1.0  # type: ignore[misc]
    moved = dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, path="/elsewhere"))
    assert moved.storage.path == "/elsewhere" and cfg.storage.path == "runs"
    assert moved.optim is cfg.optim  # untouched sections are shared, which is safe only because frozen


def test_sweep_configs_are_frozen_and_resolved_by_copy() -> None:
    import dataclasses

    from hrt_ray.tune.config import load_sweep

    sweep = load_sweep(REPO / "jobs" / "ablations" / "synthetic-tiny-window-lr.yaml")
    assert Path(sweep.config.base).is_absolute() and sweep.config.storage == sweep.storage
    for obj, key in ((sweep, "base"), (sweep.config, "storage"), (sweep.config.search, "backbone")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, key, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sweep.base.optim.max_iters = 1  # type: ignore[misc]


def test_nested_experiment_key_paths_are_joined_with_a_dot() -> None:
    """A class-count error below a section path reads ``experiment.data.synth.classes``."""
    from hrt_ray.config import ExperimentConfig, ModelConfig

    cfg = ExperimentConfig(model=ModelConfig(num_classes=3))
    with pytest.raises(ConfigError) as err:
        cfg.validate("experiment")
    assert "experiment.model.num_classes: 3 disagrees" in str(err.value)
    assert "experiment.data.synth.classes=5" in str(err.value)
    with pytest.raises(ConfigError, match=r"^model\.num_classes: 3 disagrees .* data\.synth\.classes=5"):
        cfg.validate("")

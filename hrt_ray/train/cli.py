"""``hrt-ray train [--config CONFIG] [KEY=VALUE ...]``: train (or resume) a run, evaluate, summarise.

With no ``--config`` it runs ``jobs/default.yaml`` from the current directory if present, else
the built-in defaults (tiny model on generated data, 2 CPU workers). Exit codes: 0 done,
1 training/evaluation failed, 2 bad config or an unsatisfiable resource request.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

DEFAULT_JOB = Path("jobs/default.yaml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="experiment YAML (default: jobs/default.yaml if present)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=2e-4"
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    parser.add_argument(
        "--accept-config-change",
        action="store_true",
        help="resume even though the config differs from the checkpoint's (beyond resume-safe keys); "
        "the new values then apply",
    )


def default_config_path(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    return str(DEFAULT_JOB) if DEFAULT_JOB.is_file() else None


def input_errors() -> tuple[type[Exception], ...]:
    """Errors about bad input (data, storage, checkpoints): reported in one line, exit code 1."""
    from hrt_ray.data import DataError, SpecError
    from hrt_ray.models.checkpoint import CheckpointError
    from hrt_ray.storage import StorageError

    return (DataError, SpecError, CheckpointError, StorageError)


def run(args: argparse.Namespace) -> int:
    from hrt_ray.config import ConfigError, load_config

    try:
        cfg = load_config(default_config_path(args.config), args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    from hrt_ray import storage
    from hrt_ray.eval.run import evaluate_checkpoint
    from hrt_ray.ray_local import ensure_ray
    from hrt_ray.train.resume import check_resume
    from hrt_ray.train.runlock import RunLockedError
    from hrt_ray.train.trainer import ResourceError, TrainError, fit

    try:  # a resume with a changed config or another model is refused before Ray even starts
        check_resume(cfg, accept_changes=args.accept_config_change)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except input_errors() as exc:
        print(f"error: training run {cfg.name!r} cannot resume: {exc}", file=sys.stderr)
        return 1
    ensure_ray()
    try:
        summary = fit(cfg, accept_config_change=args.accept_config_change)
    except ResourceError as exc:
        print(f"resource error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, RunLockedError) as exc:  # a changed config on resume; a run already running
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainError, *input_errors()) as exc:
        print(f"error: training run {cfg.name!r} failed: {exc}", file=sys.stderr)
        return 1
    if not args.no_eval and summary.checkpoint:
        try:
            result = evaluate_checkpoint(cfg, summary.checkpoint)
        except (TrainError, FileNotFoundError, *input_errors()) as exc:
            print(f"error: evaluation failed: {exc}", file=sys.stderr)
            return 1
        print(result.table())
        summary.eval = {"mIoU": result.miou, "setting": result.setting, "json": result.json_uri}
    storage.write_bytes(
        f"{summary.run_dir}/summary.json",
        json.dumps(asdict(summary), indent=2).encode(),
        cfg.storage.endpoint,
    )
    print("\n".join(summary.lines()))
    return 0

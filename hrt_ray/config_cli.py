"""``hrt-ray config show CONFIG [KEY=VALUE ...] [--json]`` and ``hrt-ray config runtime-env``.

``show`` prints exactly the object a run would use (file + overrides + defaults, validated);
``runtime-env`` prints the ``ray job submit`` runtime environment after checking that the
working dir it ships stays under Ray's upload limit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hrt_ray.config import ConfigError, dump_yaml, load_config, to_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION")
    sub.required = True
    show = sub.add_parser("show", help="print the resolved, validated config")
    show.add_argument("config", nargs="?", help="experiment YAML (omit for the built-in defaults)")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")
    env = sub.add_parser("runtime-env", help="check and print the runtime env for `ray job submit`")
    env.add_argument("--working-dir", default=".", help="directory `ray job submit --working-dir` ships")
    env.add_argument("--file", default=None, help="runtime env YAML (default: jobs/runtime_env.yaml)")


def run(args: argparse.Namespace) -> int:
    if args.config_command == "runtime-env":
        return _runtime_env(args)
    config = args.config
    overrides = list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)  # `config show optim.lr=1` : overrides on the defaults
        config = None
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(to_dict(cfg), indent=2) if args.json else dump_yaml(cfg), end="" if not args.json else "\n"
    )
    return 0


def _runtime_env(args: argparse.Namespace) -> int:
    # deferred: `hrt-ray --help` imports this module; the runtime-env check imports Ray (its pathspec)
    from hrt_ray.train.jobenv import RUNTIME_ENV_FILE, JobEnvError, check_working_dir, load_runtime_env

    path = args.file or str(Path(args.working_dir) / RUNTIME_ENV_FILE)
    try:
        env = load_runtime_env(path)
        size = check_working_dir(args.working_dir, env)
    except JobEnvError as exc:
        print(f"runtime env error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({**env, "working_dir": str(Path(args.working_dir).resolve())}, indent=2))
    print(f"working dir: {size.files} files, {size.bytes / 2**20:.1f} MiB to upload", file=sys.stderr)
    return 0

"""The console entry point: fast help, every registered command importable without torch/Ray."""

from __future__ import annotations

import subprocess
import sys

from hrt_ray import cli


def test_every_command_registers_its_arguments():
    parser = cli.build_parser()
    for name in cli.COMMANDS:
        # --help on each subcommand exits 0 after printing its usage.
        try:
            parser.parse_args([name, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, name


def test_help_does_not_import_torch_or_ray():
    code = (
        "import sys; from hrt_ray import cli; cli.build_parser();"
        "bad = [m for m in ('torch', 'ray') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_python_dash_m_runs_the_same_cli():
    proc = subprocess.run([sys.executable, "-m", "hrt_ray", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in cli.COMMANDS:
        assert name in proc.stdout


def test_unknown_command_is_an_error():
    proc = subprocess.run([sys.executable, "-m", "hrt_ray", "trian"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


def test_sizes_parse_as_height_by_width_and_bad_ones_name_the_value():
    import argparse

    import pytest

    from hrt_ray.config import parse_hw

    assert parse_hw("512x1024") == (512, 1024)
    assert parse_hw("97X131") == (97, 131)
    for bad in ("512", "axb", "0x5", "1x2x3"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            parse_hw(bad)


def test_export_format_choices_match_the_exporter():
    """``hrt-ray export --format`` lists the exporter's formats without importing it (torch)."""
    from hrt_ray.infer import export, export_cli

    assert tuple(export.FORMATS) == export_cli.FORMAT_CHOICES


def test_a_config_mistake_answers_without_importing_torch_or_ray():
    """The error is caught and printed (exit 2) before, and without, loading torch or Ray."""
    code = (
        "import sys; from hrt_ray.cli import main; rc = main(sys.argv[1:]);"
        "print([m for m in ('torch', 'ray') if m in sys.modules]); sys.exit(rc)"
    )
    for argv in (["train", "optim.lr=abc"], ["eval", "--checkpoint", "x.pt", "optim.lr=abc"]):
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "config error: " in proc.stderr and "optim.lr" in proc.stderr, proc.stderr
        assert proc.stdout.strip() == "[]", proc.stdout


def test_the_driver_log_is_kept_empty_only_for_a_finished_run(tmp_path):
    """A run refused before it started (the GPU preflight's deadline) must leave no run
    directory behind; a finished run keeps its log even when empty, because the summary names it."""
    from hrt_ray.train.cli import _keep_log

    empty, said = tmp_path / "empty.log", tmp_path / "said.log"
    empty.write_text("")
    said.write_text("a warning from Ray\n")
    _keep_log(empty, str(tmp_path / "refused" / "logs" / "driver.log"), None)
    assert not (tmp_path / "refused").exists()
    _keep_log(said, str(tmp_path / "failed" / "logs" / "driver.log"), None)
    assert (tmp_path / "failed" / "logs" / "driver.log").read_text() == "a warning from Ray\n"
    _keep_log(empty, str(tmp_path / "finished" / "logs" / "driver.log"), None, keep_empty=True)
    assert (tmp_path / "finished" / "logs" / "driver.log").read_text() == ""

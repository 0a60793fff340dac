"""A copy of the checkout as a user has it on their laptop, decoys included.

Shared by the tests that build what a cluster receives from the repository (Ray's working-dir
package, the Docker build context): both must ship every file of ``hrt_ray`` and none of these.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import REPO_ROOT

#: Files that must never leave the laptop: bulk outputs, a shadowing virtualenv, credentials
#: (at the top and nested), and git history.
DECOYS = {
    "data/synthetic/train/part-00000.parquet": b"\0" * 1024,
    "runs/default/checkpoint_000001/model.pt": b"\0" * 1024,
    ".venv/lib/python3.11/site-packages/hrt_ray/__init__.py": b"raise ImportError('shadow copy')\n",
    ".env": b"AWS_SECRET_ACCESS_KEY=decoy-secret\n",
    ".env.local": b"HF_TOKEN=decoy-secret\n",
    ".aws/credentials": b"[default]\naws_secret_access_key = decoy-secret\n",
    "clusters/.aws/config": b"[default]\nregion = us-west-2\n",
    "jobs/.env": b"WANDB_API_KEY=decoy-secret\n",
    ".git/config": b"[core]\n",
}


def copy_repo(dst: Path) -> Path:
    """Copy the checkout's code to ``dst`` (local bulk skipped for speed), then add the decoys."""
    skip_top = {".venv", ".git", "data", "runs", "build", "dist"}

    def ignore(directory: str, names: list[str]) -> set[str]:
        top = Path(directory).resolve() == REPO_ROOT
        return {
            n
            for n in names
            if n in {"__pycache__", ".pytest_cache", ".ruff_cache"}
            or n.endswith(".egg-info")
            or (top and n in skip_top)
        }

    shutil.copytree(REPO_ROOT, dst, ignore=ignore)
    for rel, content in DECOYS.items():
        path = dst / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return dst


def package_files() -> set[str]:
    """Every module and package-data file of hrt_ray in the source tree, relative to the repo."""
    return {
        p.relative_to(REPO_ROOT).as_posix()
        for p in (REPO_ROOT / "hrt_ray").rglob("*")
        if p.suffix in {".py", ".yaml", ".json"} and "__pycache__" not in p.parts
    }

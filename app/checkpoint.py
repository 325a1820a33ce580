"""Checkpoint files: atomic writes, finding the newest complete one, and reading a checkpoint's
config without building anything.

NOTE: every load uses `weights_only=True`: a checkpoint someone hands you cannot run code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from app.errors import UserError

LAST = "last.ckpt"
_STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}.ckpt"


def list_checkpoints(dirpath: Path) -> list[Path]:
    """Complete checkpoints in `dirpath`, oldest first (temporary files are never listed)."""
    if not dirpath.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in dirpath.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(dirpath: Path) -> Path | None:
    """`last` if it resolves, else the newest step file, else None."""
    last = dirpath / LAST
    if last.exists():  # follows the symlink: a dangling one does not count
        return last.resolve()
    found = list_checkpoints(dirpath)
    return found[-1] if found else None


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary name, fsync, then rename: a kill mid-write loses nothing."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = True) -> dict[str, Any]:
        return read_checkpoint(Path(path))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The whole checkpoint dict, on CPU, loaded with weights_only=True; UserError if unreadable."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or holds arbitrary objects
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read checkpoint {path}: {first[:200]} (is it a complete moe-lm checkpoint?)") from None


def checkpoint_config(path: Path) -> str:
    """The resolved config YAML a checkpoint carries (so the checkpoint alone rebuilds its model)."""
    checkpoint = read_checkpoint(path)
    if "experiment_config" not in checkpoint:
        raise UserError(f"{path} carries no moe-lm config: it is not a checkpoint of this project")
    return checkpoint["experiment_config"]

"""Checkpoint files: atomic writes, finding the newest complete one, and reading a checkpoint's
config without building anything.

NOTE: every load uses `weights_only=True`: a checkpoint someone hands you cannot run code.
"""

from __future__ import annotations

import os
import pickle
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
            _fsync_dir(path.parent)  # make the rename itself durable
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = True) -> dict[str, Any]:
        return read_checkpoint(Path(path))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DISTRIBUTED_META = "meta.pt"  # in a distributed checkpoint folder: everything but the tensors


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The whole checkpoint dict (for a distributed checkpoint folder: all but the sharded model
    and optimizer), on CPU, loaded with weights_only=True; UserError if unreadable."""
    if path.is_dir():
        if not (path / DISTRIBUTED_META).is_file():
            raise UserError(f"{path} is a folder but not a distributed checkpoint (no {DISTRIBUTED_META}): give a "
                            "checkpoint, e.g. runs/<name>/checkpoints/last.ckpt")
        path = path / DISTRIBUTED_META
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):  # weights_only refused an object that could run code
            raise UserError(f"{path} holds objects other than tensors and plain data: refused (not a moe-lm checkpoint)") from None
        raise UserError(f"cannot read checkpoint {path}: not a checkpoint file") from None
    except Exception:  # truncated, or not a torch file at all
        raise UserError(f"cannot read checkpoint {path}: truncated or not a checkpoint file") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, not a moe-lm checkpoint")
    return checkpoint


def checkpoint_config(path: Path) -> str:
    """The resolved config YAML a checkpoint carries (so the checkpoint alone rebuilds its model)."""
    checkpoint = read_checkpoint(path)
    if "experiment_config" not in checkpoint:
        raise UserError(f"{path} carries no moe-lm config: it is not a checkpoint of this project")
    return checkpoint["experiment_config"]


def file_to_distributed(path: Path, module, out: Path) -> Path:
    """Rewrite a single-process checkpoint file as a distributed checkpoint folder (the layout
    Lightning's ModelParallelStrategy writes), so a run saved on one process resumes on several.

    `module` is a fresh MoELanguageModel of the same config: the weights and optimizer state go
    through it to get their fully-qualified names. Idempotent: an existing complete folder is kept.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    if (out / DISTRIBUTED_META).is_file():
        return out
    checkpoint = read_checkpoint(path)
    module.configure_model()
    module.load_state_dict(checkpoint["state_dict"])
    optimizer = module.configure_optimizers()["optimizer"]
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    state = {"state_dict": get_model_state_dict(module), "optimizer_0": get_optimizer_state_dict(module, optimizer)}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    dcp.save(state, checkpoint_id=tmp, no_dist=True)
    rest = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    torch.save(rest, tmp / DISTRIBUTED_META)
    os.replace(tmp, out)
    return out


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's model weights (a file, or a distributed folder at any ep size) into a
    single-process model built from the checkpoint's own config. Read-only."""
    if path.is_dir():
        import torch.distributed.checkpoint as dcp

        state = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
        try:
            dcp.load(state, checkpoint_id=path, no_dist=True)
        except Exception as err:  # missing keys, wrong shapes, damaged shards
            raise UserError(f"cannot load the weights in {path}: {str(err).splitlines()[0][:200]}") from None
        return
    weights = {k.removeprefix("model."): v for k, v in read_checkpoint(path)["state_dict"].items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # torch's first line is a header; the next names the weight
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise UserError(f"the weights in {path} do not fit its own config: {detail[:200]}") from None

"""Checkpoints every N optimizer steps and at the end, with `last` pointing at the newest.

Files are `step-0000100.ckpt`; `last.ckpt` is a symlink to the newest, swapped atomically. The
writes themselves go to a temporary name first (app/checkpoint.py), so a kill at any moment leaves
the previous checkpoints intact and never a partial file under a checkpoint's name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy

from app.checkpoint import LAST, checkpoint_name, list_checkpoints


class Checkpointing(L.Callback):
    def __init__(self, dirpath: Path, *, every: int, keep: int):
        self.dirpath, self.every, self.keep = Path(dirpath), every, keep

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        step = trainer.global_step
        if step % self.every == 0 or step >= trainer.max_steps:
            self.save(trainer, step)

    def save(self, trainer: L.Trainer, step: int) -> Path:
        path = self.dirpath / checkpoint_name(step)
        if isinstance(trainer.strategy, ModelParallelStrategy):
            # A distributed checkpoint is a folder every rank writes into: write it under a
            # temporary name, then rename it once all ranks are done.
            tmp = self.dirpath / f".{path.name}.tmp"
            trainer.save_checkpoint(tmp, weights_only=False)
            trainer.strategy.barrier("checkpoint-written")
            if trainer.is_global_zero:
                _remove(path)
                os.replace(tmp, path)
        else:
            trainer.save_checkpoint(path, weights_only=False)  # atomic: app.checkpoint.AtomicCheckpointIO
        if trainer.is_global_zero:
            _point_last(self.dirpath, path)
            for old in list_checkpoints(self.dirpath)[: -self.keep]:
                _remove(old)
        trainer.strategy.barrier("checkpoint")
        return path


def _point_last(dirpath: Path, target: Path) -> None:
    tmp = dirpath / f".{LAST}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.name)
    os.replace(tmp, dirpath / LAST)  # atomic: `last` is always a complete checkpoint


def _remove(path: Path) -> None:
    if path.is_dir():  # a distributed checkpoint is a folder
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)

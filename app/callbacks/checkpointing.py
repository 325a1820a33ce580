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
    """NOTE: on a step that also validates, the checkpoint is written after the validation, so a
    kill in between resumes before the step and the validation is not lost."""

    def __init__(self, dirpath: Path, *, every: int, keep: int, val_every: int = 0):
        self.dirpath, self.every, self.keep, self.val_every = Path(dirpath), every, keep, val_every
        self._after_validation: int | None = None  # a step whose checkpoint waits for its validation

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        step = trainer.global_step
        if self._after_validation is not None:  # its validation did not run: save it now
            self.save(trainer, self._after_validation)
            self._after_validation = None
        if step % self.every == 0 or step >= trainer.max_steps:
            if self.val_every and step % self.val_every == 0:
                self._after_validation = step
            else:
                self.save(trainer, step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation is not None and self._after_validation == trainer.global_step and not trainer.sanity_checking:
            step, self._after_validation = self._after_validation, None
            self.save(trainer, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation is not None:
            self.save(trainer, self._after_validation)
            self._after_validation = None

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

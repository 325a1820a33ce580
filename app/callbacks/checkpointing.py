"""Checkpoints every N optimizer steps, at the end, and on Ctrl-C, with `last` pointing at the newest.

Files are `step-0000100.ckpt`; `last.ckpt` is a symlink to the newest, swapped atomically. The
writes themselves go to a temporary name first (app/checkpoint.py), so a kill at any moment leaves
the previous checkpoints intact and never a partial file under a checkpoint's name.

A checkpoint that cannot be written (disk full, quota, file too large, ...) stops the run with one
line naming the file and the reason (TrainingStopped, exit 1): its temporary is removed, and `last`
still points at the previous checkpoint. Weights that are not finite are never written.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.api import CheckpointException

from app.callbacks.interrupt import Interrupt
from app.checkpoint import LAST, checkpoint_name, latest_checkpoint, list_checkpoints
from app.nonfinite import nonfinite_names
from app.trainer import EXIT_INTERRUPTED, TrainingStopped, on_any_rank

_ADVICE = {  # what to do about the write errors a user can fix
    errno.ENOSPC: ": free space or set trainer.keep_checkpoints lower",
    errno.EDQUOT: ": free space or set trainer.keep_checkpoints lower",
    errno.EFBIG: ": raise the file-size limit (ulimit -f)",
}


class Checkpointing(L.Callback):
    """NOTE: on a step that also validates, the checkpoint is written after the validation, so a
    kill in between resumes before the step and the validation is not lost.

    With an `interrupt` (Ctrl-C), the step during which it came is checkpointed like any other
    (after its validation if it has one), then every rank raises TrainingStopped (exit 130).
    """

    def __init__(self, dirpath: Path, *, every: int, keep: int, val_every: int = 0, interrupt: Interrupt | None = None):
        self.dirpath, self.every, self.keep, self.val_every = Path(dirpath), every, keep, val_every
        self.interrupt = interrupt
        self._after_validation: int | None = None  # a step whose checkpoint waits for its validation
        self._stop_after: int | None = None  # the step whose checkpoint ends the run (Ctrl-C)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        step = trainer.global_step
        if self._after_validation is not None:  # its validation did not run: save it now
            self._save_then_maybe_stop(trainer, self._after_validation)
            self._after_validation = None
        # A collective on every step (all ranks stop after the same one); the last step ends anyway.
        if self.interrupt is not None and self.interrupt.requested(trainer) and step < trainer.max_steps:
            self._stop_after = step
        if step % self.every == 0 or step >= trainer.max_steps or self._stop_after == step:
            if self.val_every and step % self.val_every == 0:
                self._after_validation = step
            else:
                self._save_then_maybe_stop(trainer, step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation is not None and self._after_validation == trainer.global_step and not trainer.sanity_checking:
            step, self._after_validation = self._after_validation, None
            self._save_then_maybe_stop(trainer, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation is not None:
            self.save(trainer, self._after_validation)
            self._after_validation = None

    def _save_then_maybe_stop(self, trainer: L.Trainer, step: int) -> None:
        path = self.save(trainer, step)
        if self._stop_after == step:
            raise TrainingStopped(f"interrupted at step {step}: checkpoint saved to {path}; run the same command "
                                  "to resume", exit_code=EXIT_INTERRUPTED, mlflow_status="KILLED",
                                  rank_zero=trainer.is_global_zero)

    def save(self, trainer: L.Trainer, step: int) -> Path:
        path = self.dirpath / checkpoint_name(step)
        _refuse_nonfinite_weights(trainer, step)
        distributed = isinstance(trainer.strategy, ModelParallelStrategy)
        # A distributed checkpoint is a folder every rank writes into: write it under a temporary
        # name, then rename it once all ranks are done (a file is renamed by AtomicCheckpointIO).
        error = _write(trainer, _folder_tmp(path) if distributed else path)
        if on_any_rank(trainer, error is not None):  # also the barrier before the rename
            raise self._write_failed(trainer, path, error)
        if trainer.is_global_zero:
            if distributed:
                _remove(path)
                os.replace(_folder_tmp(path), path)
            _point_last(self.dirpath, path)
            for old in list_checkpoints(self.dirpath)[: -self.keep]:
                _remove(old)
        trainer.strategy.barrier("checkpoint")
        return path

    def _write_failed(self, trainer: L.Trainer, path: Path, error: BaseException | None) -> TrainingStopped:
        if trainer.is_global_zero:
            _remove(_folder_tmp(path))  # a distributed checkpoint's partial folder
        os_error = _os_error(error) if error is not None else None
        reason = os.strerror(os_error.errno).lower() if os_error is not None and os_error.errno else "a rank failed"
        previous = latest_checkpoint(self.dirpath)
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        advice = _ADVICE.get(os_error.errno, "") if os_error is not None else ""
        return TrainingStopped(f"{reason} writing checkpoint {path}{advice}; {kept}", rank_zero=trainer.is_global_zero)


def _write(trainer: L.Trainer, path: Path) -> BaseException | None:
    """Write this rank's part of the checkpoint; the file-system error it met, if any."""
    try:
        trainer.save_checkpoint(path, weights_only=False)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        if _os_error(err) is None:
            raise  # not the file system's doing: a bug, keep its traceback
        if isinstance(trainer.strategy, ModelParallelStrategy) and not isinstance(err, CheckpointException):
            # NOTE: the distributed writer fails on every rank at once (CheckpointException); any
            # other error is rank 0's own (meta.pt), which skipped the barrier that ends
            # Trainer.save_checkpoint on the other ranks: meet them there.
            trainer.strategy.barrier("Trainer.save_checkpoint")
        return err
    return None


def _refuse_nonfinite_weights(trainer: L.Trainer, step: int) -> None:
    """NOTE: the optimizer step never takes non-finite gradients (MoELanguageModel), so this should
    never fire; it is the last line of defence for `last` (one cheap pass per checkpoint)."""
    module = trainer.lightning_module
    bad = nonfinite_names(module.named_parameters()) if module is not None else []
    if bad:
        raise TrainingStopped(f"non-finite weights at step {step} (first: {bad[0]}): not checkpointed",
                              rank_zero=trainer.is_global_zero, name_last_checkpoint=True)


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind a failed write: torch.save wraps it in a RuntimeError, the distributed
    checkpoint writer in a CheckpointException (per rank)."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        todo += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            todo += [pair[0] if isinstance(pair, tuple) else pair for pair in e.failures.values()]
    return None


def _folder_tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


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

"""Ctrl-C (SIGINT) stops training cleanly: the optimizer step under way finishes, its checkpoint is
written (Checkpointing asks `requested` at every step boundary), then the run ends with exit code
130 and its MLflow run KILLED; the same command resumes it exactly. A second Ctrl-C aborts at once:
nothing of the step under way is saved (a checkpoint being written is dropped whole, as writes go
to a temporary name) and the run resumes from the previous checkpoint.

Every rank installs the handler (a terminal's Ctrl-C reaches the whole process group) and the flag
is summed over ranks at each step boundary, so all ranks stop after the same step even when only
one of them got the signal. NOTE: while it is installed, Lightning's own KeyboardInterrupt handling
(trainer/call.py: exit code 1, no checkpoint) never sees the signal.
"""

from __future__ import annotations

import os
import signal
import threading

import lightning as L

from app.trainer import EXIT_INTERRUPTED, TrainingStopped, on_any_rank


class Interrupt(L.Callback):
    def __init__(self) -> None:
        self._signals = 0
        self._previous = None  # the SIGINT handler to put back
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._trainer, self._signals = trainer, 0
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def requested(self, trainer: L.Trainer) -> bool:
        """Whether any rank got Ctrl-C. A collective: every rank calls it at the same point."""
        return on_any_rank(trainer, self._signals > 0)

    def _on_sigint(self, signum, frame) -> None:
        self._signals += 1
        trainer = self._trainer
        if self._signals == 1:
            if trainer.is_global_zero:  # os.write: a print could re-enter a stream being written
                os.write(2, b"\nCtrl-C: stopping once this step and its checkpoint are done "
                            b"(Ctrl-C again to abort at once)\n")
            return
        self._restore()  # a third Ctrl-C during the clean-up is a plain KeyboardInterrupt
        raise TrainingStopped(f"aborted by a second Ctrl-C during step {trainer.global_step + 1}: "
                              "nothing of it was saved", exit_code=EXIT_INTERRUPTED, mlflow_status="KILLED", rank_zero=trainer.is_global_zero,
                              name_last_checkpoint=True)

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

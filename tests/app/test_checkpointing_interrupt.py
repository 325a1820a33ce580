"""app/callbacks/interrupt.py with Checkpointing: a real SIGINT sent to this process stops training
after the step under way, once that step's checkpoint is written (after its validation if it has
one); a second SIGINT aborts at once; the handler is put back when training ends."""

from __future__ import annotations

import os
import signal

import pytest

from app.callbacks import Checkpointing, Interrupt
from app.checkpoint import LAST, checkpoint_name, list_checkpoints, read_checkpoint
from app.trainer import EXIT_INTERRUPTED, TrainingStopped
from tests.app.test_checkpoint import FakeTrainer


@pytest.fixture
def interrupt():
    previous = signal.getsignal(signal.SIGINT)
    handler = Interrupt()
    yield handler
    handler.teardown(None, None, "fit")
    assert signal.getsignal(signal.SIGINT) is previous  # training over: Ctrl-C is Python's again


def step(callback: Checkpointing, trainer: FakeTrainer, to: int) -> None:
    """Advance to optimizer step `to` (one micro-batch per step)."""
    trainer.global_step = to
    callback.on_train_batch_end(trainer, None, {}, None, to - 1)


def test_ctrl_c_checkpoints_the_step_under_way_then_stops(tmp_path, interrupt):
    trainer = FakeTrainer(accumulate=1, max_steps=100)
    callback = Checkpointing(tmp_path, every=10, keep=2, interrupt=interrupt)
    interrupt.setup(trainer, None, "fit")
    for s in range(1, 4):
        step(callback, trainer, s)
    os.kill(os.getpid(), signal.SIGINT)  # handled between two bytecodes: a flag, no exception
    with pytest.raises(TrainingStopped) as err:
        step(callback, trainer, 4)
    assert (err.value.exit_code, err.value.mlflow_status) == (EXIT_INTERRUPTED, "KILLED")
    path = tmp_path / checkpoint_name(4)
    assert str(err.value) == f"interrupted at step 4: checkpoint saved to {path}; run the same command to resume"
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(4)]  # not a multiple of every=10
    assert os.readlink(tmp_path / LAST) == checkpoint_name(4)
    assert read_checkpoint(path)["global_step"] == 4


def test_ctrl_c_on_a_validation_step_checkpoints_after_the_validation(tmp_path, interrupt):
    trainer = FakeTrainer(accumulate=2, max_steps=100)
    callback = Checkpointing(tmp_path, every=10, keep=2, val_every=5, interrupt=interrupt)
    interrupt.setup(trainer, None, "fit")
    trainer.global_step = 4
    callback.on_train_batch_end(trainer, None, {}, None, 8)  # the first micro-batch of step 5
    os.kill(os.getpid(), signal.SIGINT)
    trainer.global_step = 5
    callback.on_train_batch_end(trainer, None, {}, None, 9)  # step 5 done: its validation comes next
    assert list_checkpoints(tmp_path) == []
    with pytest.raises(TrainingStopped, match="interrupted at step 5"):
        callback.on_validation_end(trainer, None)
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(5)]


def test_a_second_ctrl_c_aborts_at_once_without_a_checkpoint(tmp_path, interrupt):
    trainer = FakeTrainer(accumulate=1, max_steps=100)
    callback = Checkpointing(tmp_path, every=2, keep=2, interrupt=interrupt)
    interrupt.setup(trainer, None, "fit")
    step(callback, trainer, 2)
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(TrainingStopped) as err:
        os.kill(os.getpid(), signal.SIGINT)  # raised by the handler, wherever the program was
    assert (err.value.exit_code, err.value.mlflow_status) == (EXIT_INTERRUPTED, "KILLED")
    assert str(err.value) == "aborted by a second Ctrl-C during step 3: nothing of it was saved"
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(2)]
    with pytest.raises(KeyboardInterrupt):  # a third is Python's own again
        os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_during_the_last_step_lets_the_run_finish(tmp_path, interrupt):
    trainer = FakeTrainer(accumulate=1, max_steps=3)
    callback = Checkpointing(tmp_path, every=10, keep=2, interrupt=interrupt)
    interrupt.setup(trainer, None, "fit")
    step(callback, trainer, 2)
    os.kill(os.getpid(), signal.SIGINT)
    step(callback, trainer, 3)  # the final checkpoint, no stop: the run is complete
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(3)]


def test_the_handler_is_installed_for_fit_only(interrupt):
    trainer = FakeTrainer(accumulate=1, max_steps=3)
    before = signal.getsignal(signal.SIGINT)
    interrupt.setup(trainer, None, "validate")
    assert signal.getsignal(signal.SIGINT) is before
    interrupt.setup(trainer, None, "fit")
    assert signal.getsignal(signal.SIGINT) == interrupt._on_sigint

"""app/checkpoint.py, app/callbacks/checkpointing.py and app/run_lock.py: atomic writes, finding
the newest complete checkpoint, refusing unreadable or unsafe files, the save cadence with `last`,
never writing non-finite weights, and the run lock (real processes holding, refused, killed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from app.callbacks.checkpointing import Checkpointing
from app.checkpoint import (
    LAST,
    AtomicCheckpointIO,
    checkpoint_config,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
)
from app.errors import UserError
from app.run_lock import lock_run
from app.trainer import TrainingStopped

REPO = Path(__file__).resolve().parents[2]


def touch(path: Path, content: bytes = b"x") -> Path:
    path.write_bytes(content)
    return path


def assert_one_line_user_error(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert str(path) in message
    assert err.value.__suppress_context__ or err.value.__cause__ is None
    return message


# ---------------------------------------------------------------------------------------------
# AtomicCheckpointIO
# ---------------------------------------------------------------------------------------------


def test_save_writes_a_readable_file_and_no_temporaries(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "step-0000001.ckpt"  # the folder is created
    io.save_checkpoint({"w": torch.arange(6.0).view(2, 3), "step": 1}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["step-0000001.ckpt"]
    loaded = io.load_checkpoint(path)
    assert loaded["step"] == 1
    torch.testing.assert_close(loaded["w"], torch.arange(6.0).view(2, 3))


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last-good.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk, then the process fails
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last-good.ckpt"]  # no temporary file left


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, tmp_path / "step-0000001.ckpt")
    assert list(tmp_path.iterdir()) == []
    assert latest_checkpoint(tmp_path) is None


# ---------------------------------------------------------------------------------------------
# Listing and finding checkpoints
# ---------------------------------------------------------------------------------------------


def test_checkpoint_name_sorts_lexically_and_numerically():
    assert checkpoint_name(42) == "step-0000042.ckpt"


def test_list_checkpoints_orders_by_step_and_skips_everything_else(tmp_path):
    for step in (100, 9, 20):
        touch(tmp_path / checkpoint_name(step))
    touch(tmp_path / "step-1000000000.ckpt")  # wider than the padding: still ordered by number
    touch(tmp_path / f".{checkpoint_name(300)}.tmp-1234")  # an interrupted write
    touch(tmp_path / ".step-0000400.ckpt")  # hidden
    touch(tmp_path / "step-0000500.ckpt.tmp")
    touch(tmp_path / "notes.txt")
    (tmp_path / LAST).symlink_to(checkpoint_name(100))
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-0000009.ckpt", "step-0000020.ckpt", "step-0000100.ckpt", "step-1000000000.ckpt"]


def test_list_checkpoints_of_a_missing_folder(tmp_path):
    assert list_checkpoints(tmp_path / "nope") == []


def test_latest_follows_last(tmp_path):
    for step in (10, 20):
        touch(tmp_path / checkpoint_name(step))
    (tmp_path / LAST).symlink_to(checkpoint_name(10))  # `last` wins even over a newer step file
    assert latest_checkpoint(tmp_path) == (tmp_path / checkpoint_name(10)).resolve()


def test_latest_falls_back_when_last_dangles(tmp_path):
    for step in (10, 20, 3):
        touch(tmp_path / checkpoint_name(step))
    (tmp_path / LAST).symlink_to(checkpoint_name(30))  # deleted, or never completed
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(20)


@pytest.mark.parametrize("make", ["missing", "empty", "only-temporaries"])
def test_latest_of_nothing_is_none(tmp_path, make):
    folder = tmp_path / "checkpoints"
    if make != "missing":
        folder.mkdir()
    if make == "only-temporaries":
        touch(folder / f".{checkpoint_name(5)}.tmp-99")
        (folder / LAST).symlink_to(checkpoint_name(5))
    assert latest_checkpoint(folder) is None


# ---------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------


def test_read_checkpoint_round_trip(tmp_path):
    path = tmp_path / "c.ckpt"
    torch.save({"state_dict": {"w": torch.eye(2)}, "experiment_config": "a: 1\n", "global_step": 7}, path)
    checkpoint = read_checkpoint(path)
    assert checkpoint["global_step"] == 7 and checkpoint_config(path) == "a: 1\n"
    assert checkpoint["state_dict"]["w"].device.type == "cpu"


def test_read_a_distributed_checkpoint_folder(tmp_path):
    """A distributed checkpoint is a folder of shards plus `meta.pt` with everything else."""
    folder = tmp_path / checkpoint_name(8)
    folder.mkdir()
    touch(folder / "__0_0.distcp", b"shard bytes")
    torch.save({"experiment_config": "b: 2\n", "global_step": 8}, folder / "meta.pt")
    assert read_checkpoint(folder)["global_step"] == 8
    assert checkpoint_config(folder) == "b: 2\n"
    assert list_checkpoints(tmp_path) == [folder]


def test_distributed_folder_without_meta_is_a_user_error(tmp_path):
    folder = tmp_path / checkpoint_name(8)
    folder.mkdir()
    with pytest.raises(UserError) as err:
        read_checkpoint(folder)
    assert "is a folder but not a distributed checkpoint (no meta.pt)" in assert_one_line_user_error(err, folder)


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "c.ckpt"
    torch.save({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    assert_one_line_user_error(err, path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content", [b"hello world\nsecond line\n", b"", b"\x80\x04K\x01."])
def test_non_torch_file_is_a_user_error(tmp_path, content):
    path = touch(tmp_path / "c.ckpt", content)
    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    assert_one_line_user_error(err, path)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as err:
        read_checkpoint(tmp_path / "gone.ckpt")
    assert "not found" in assert_one_line_user_error(err, tmp_path / "gone.ckpt")


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_checkpoint_with_code_is_refused_without_running_it(tmp_path, writer):
    import pickle

    marker = tmp_path / "code-ran"
    Payload.marker = marker
    payload = {"state_dict": {"w": torch.ones(2)}, "experiment_config": "a: 1\n", "extra": Payload()}
    path = tmp_path / "c.ckpt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    # Sanity check of the payload itself: a plain unpickle does run it.
    assert not marker.exists()
    if writer == "pickle":
        pickle.loads(path.read_bytes())
        assert marker.exists()
        marker.unlink()

    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    assert_one_line_user_error(err, path)
    with pytest.raises(UserError):
        checkpoint_config(path)
    assert not marker.exists()


def test_torch_file_without_a_config_is_a_user_error(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(UserError) as err:
        checkpoint_config(path)
    assert "config" in assert_one_line_user_error(err, path)


def test_torch_file_holding_a_tensor_is_a_user_error(tmp_path):
    path = tmp_path / "tensor.ckpt"
    torch.save(torch.ones(3), path)
    with pytest.raises(UserError):
        checkpoint_config(path)


# ---------------------------------------------------------------------------------------------
# The Checkpointing callback
# ---------------------------------------------------------------------------------------------


class FakeTrainer:
    """What the callback uses: step counters, a save that writes the step, rank 0, a barrier, a
    one-process reduce (the identity) and a module whose weights are checked before each save."""

    def __init__(self, *, accumulate: int, max_steps: int):
        self.accumulate_grad_batches, self.max_steps, self.global_step = accumulate, max_steps, 0
        self.is_global_zero = True
        self.barriers = 0
        self.strategy = SimpleNamespace(barrier=self._barrier, reduce=lambda t, reduce_op=None: t,
                                        root_device=torch.device("cpu"))
        self.lightning_module = torch.nn.Linear(2, 2)
        self.sanity_checking = False

    def _barrier(self, name=None):
        self.barriers += 1

    def save_checkpoint(self, path, weights_only=False):
        AtomicCheckpointIO().save_checkpoint({"global_step": self.global_step}, path)


def run_steps(callback: Checkpointing, trainer: FakeTrainer) -> None:
    batch_idx = 0
    for step in range(1, trainer.max_steps + 1):
        for micro in range(trainer.accumulate_grad_batches):
            last_micro = micro == trainer.accumulate_grad_batches - 1
            trainer.global_step = step if last_micro else step - 1
            callback.on_train_batch_end(trainer, None, {}, None, batch_idx)
            batch_idx += 1


def test_checkpoints_every_n_steps_and_at_the_end_keeping_the_newest(tmp_path):
    trainer = FakeTrainer(accumulate=2, max_steps=7)
    saved = []
    callback = Checkpointing(tmp_path, every=3, keep=2)
    original = callback.save
    callback.save = lambda t, step: saved.append(step) or original(t, step)
    run_steps(callback, trainer)

    assert saved == [3, 6, 7]  # on optimizer-step boundaries only, and the final step
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(6), checkpoint_name(7)]
    assert os.readlink(tmp_path / LAST) == checkpoint_name(7)  # relative: the folder can move
    assert read_checkpoint(latest_checkpoint(tmp_path))["global_step"] == 7
    assert trainer.barriers == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, checkpoint_name(6), checkpoint_name(7)]


def test_pruning_removes_checkpoint_folders(tmp_path):
    trainer = FakeTrainer(accumulate=1, max_steps=3)

    def save_folder(path, weights_only=False):  # what a distributed checkpoint looks like
        path.mkdir()
        torch.save({"global_step": trainer.global_step}, path / "meta.pt")

    trainer.save_checkpoint = save_folder
    run_steps(Checkpointing(tmp_path, every=1, keep=1), trainer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, checkpoint_name(3)]
    assert read_checkpoint(latest_checkpoint(tmp_path))["global_step"] == 3


def test_only_rank_zero_moves_last_and_prunes(tmp_path):
    trainer = FakeTrainer(accumulate=1, max_steps=4)
    callback = Checkpointing(tmp_path, every=1, keep=1)
    run_steps(callback, trainer)
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(4)]
    trainer.is_global_zero = False
    trainer.global_step = 5
    callback.save(trainer, 5)
    assert os.readlink(tmp_path / LAST) == checkpoint_name(4)
    assert len(list_checkpoints(tmp_path)) == 2


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    trainer = FakeTrainer(accumulate=1, max_steps=2)
    callback = Checkpointing(tmp_path, every=1, keep=5)
    run_steps(callback, trainer)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        trainer.lightning_module.bias[1] = float("nan")
    trainer.global_step = 3
    with pytest.raises(TrainingStopped, match=r"^non-finite weights at step 3 \(first: bias\): not checkpointed$"):
        callback.save(trainer, 3)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert os.readlink(tmp_path / LAST) == checkpoint_name(2)


# ---------------------------------------------------------------------------------------------
# app/run_lock.py: one training process per run name
# ---------------------------------------------------------------------------------------------

LOCKER = """
import sys
from pathlib import Path
from app.run_lock import lock_run
from app.errors import UserError
try:
    lock_run(Path(sys.argv[1]), sys.argv[2])
    lock_run(Path(sys.argv[1]), sys.argv[2])  # again (make eval trains in one process): already held
except UserError as err:
    print(f"error: {err}", flush=True)
    sys.exit(2)
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes stdin (or kills this process)
"""


def locker(root: Path, name: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOCKER, str(root), name], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, **env})


def test_a_locked_run_refuses_a_second_process_until_the_holder_is_killed(tmp_path):
    root = tmp_path / "runs"
    holder = locker(root, "x")
    try:
        assert holder.stdout.readline() == "locked\n"
        assert (root / ".x.lock").read_text() == f"{holder.pid}\n"
        second = locker(root, "x")
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 2
        assert out == (f"error: run x is being trained by another process (PID {holder.pid}, lock {root / '.x.lock'}): "
                       "wait for it to finish or stop it, or give this run another run.name\n")
        other = locker(root, "y")  # another run name is not affected
        assert other.stdout.readline() == "locked\n"
        other.communicate("", timeout=60)
        assert other.returncode == 0 and not (root / ".y.lock").exists()  # removed at a normal exit
        # A launcher's other ranks belong to the holder's run: they neither lock nor refuse.
        rank1 = locker(root, "x", LOCAL_RANK="1")
        assert rank1.stdout.readline() == "locked\n"
        rank1.communicate("", timeout=60)
    finally:
        holder.kill()  # kill -9: the kernel releases the lock, the file stays
        holder.wait()
    assert (root / ".x.lock").exists()
    third = locker(root, "x")
    assert third.stdout.readline() == "locked\n"
    third.communicate("", timeout=60)
    assert third.returncode == 0 and list(root.iterdir()) == []


def test_a_lock_that_created_the_runs_folder_removes_it_at_exit(tmp_path):
    root = tmp_path / "a" / "runs"
    proc = locker(root, "x")
    assert proc.stdout.readline() == "locked\n"
    assert root.is_dir()
    proc.communicate("", timeout=60)
    assert proc.returncode == 0 and list(tmp_path.iterdir()) == []  # nothing left behind


def test_a_runs_folder_that_cannot_be_written_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match=r"cannot write in the runs folder .*/file/runs \(Not a directory\): "
                                        r"choose a writable run.root"):
        lock_run(tmp_path / "file" / "runs", "x")

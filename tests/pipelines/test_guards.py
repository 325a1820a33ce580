"""End to end: faults REALLY injected into `python -m pipelines train` subprocesses.

- Ctrl-C: a real SIGINT; the step under way is checkpointed, exit 130, MLflow run KILLED, and the
  same command resumes it to exactly the uninterrupted run (same losses at every step, same weights).
- Non-finite values: NaN written into a checkpoint's weights (one process, and two processes with
  expert parallelism), and a learning rate that diverges; the message names the step and where
  the value appeared, exit 1, MLflow run FAILED, the last checkpoint untouched and finite.
- Two trainings of one run: the second is refused (exit 2, one line naming the holder's PID) and
  changes nothing; the first finishes like the uninterrupted run; a kill -9 frees the lock.
- Disk full: a real tmpfs too small for the second checkpoint; one line, exit 1, the previous
  checkpoint intact and `last`, no temporary left; after freeing space the same command resumes.

The reference for "exactly" is one uninterrupted run with the same settings; every run shares its
working folder (so one MLflow store), each under its own run name.
"""

from __future__ import annotations

import fcntl
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.pipelines.conftest import RUN_TIMEOUT_S, JobResult, TrainJob, Tracking, snapshot_diff, tree_snapshot

STEPS, EVERY = 20, 5
OVERRIDES = (f"trainer.max_steps={STEPS}", f"trainer.ckpt_every={EVERY}", f"trainer.val_every={EVERY}",
             "trainer.log_every=1", "trainer.keep_checkpoints=2",
             "moe.router.jitter_eps=0.1")  # router noise: a resume must replay it exactly
CHECKPOINT_MB = 1.9  # a debug checkpoint is ~1.9 MiB (weights + Adam moments)


@dataclass
class Reference:
    cwd: Path
    tracking: Tracking
    losses: dict[int, float]  # train/loss by step
    weights: dict[str, torch.Tensor]  # at the final step

    def checkpoints(self, name: str) -> Path:
        return self.cwd / "runs" / name / "checkpoints"


@pytest.fixture(scope="module")
def ref(tmp_path_factory, train_job: TrainJob) -> Reference:
    cwd = tmp_path_factory.mktemp("guards")
    result = train_job.run(cwd, train_job.debug_args(*OVERRIDES, "run.name=ref"))
    assert result.returncode == 0, result.explain()
    tracking = Tracking(cwd)
    losses = tracking.last(tracking.only_run("ref").info.run_id, "train/loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return Reference(cwd, tracking, losses, _weights(cwd / "runs/ref/checkpoints" / _name(STEPS)))


def _name(step: int) -> str:
    return f"step-{step:07d}.ckpt"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_weights(path: Path, ref: Reference) -> None:
    weights = _weights(path)
    assert weights.keys() == ref.weights.keys()
    assert [k for k in weights if not torch.equal(weights[k], ref.weights[k])] == []


def _assert_finite(path: Path) -> None:
    assert all(torch.isfinite(v).all() for v in _weights(path).values() if v.is_floating_point()), path


def _last_line(result: JobResult) -> str:
    assert "Traceback" not in result.stderr, result.explain()
    return result.stderr.strip().splitlines()[-1]


def _start(train_job: TrainJob, cwd: Path, args: list[str], name: str) -> tuple[subprocess.Popen, Path]:
    stderr = cwd / f"{name}.stderr"
    return train_job.popen(cwd, args, stderr), stderr


def _wait_for(proc: subprocess.Popen, stderr: Path, ready, what: str, timeout: float = 240):
    """Poll `ready()` until it is truthy; fail if the process exits first."""
    deadline = time.monotonic() + timeout
    while not (found := ready()):
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {what}:\n{stderr.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.005)
    return found


def _finish(proc: subprocess.Popen, stderr: Path) -> JobResult:
    try:
        returncode = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    return JobResult([str(a) for a in proc.args], returncode, "", stderr.read_text(), 0.0)


# ---------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_checkpoints_the_step_and_the_same_command_resumes_like_the_uninterrupted_run(
        ref: Reference, train_job: TrainJob):
    args = train_job.debug_args(*OVERRIDES, "run.name=ctrl-c")
    checkpoints = ref.checkpoints("ctrl-c")
    proc, stderr = _start(train_job, ref.cwd, args, "ctrl-c")
    _wait_for(proc, stderr, (checkpoints / _name(EVERY)).exists, "its first checkpoint")
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
    interrupted = _finish(proc, stderr)

    assert interrupted.returncode == 130, interrupted.explain()
    found = re.fullmatch(r"interrupted at step (\d+): checkpoint saved to (\S+); run the same command to resume",
                         _last_line(interrupted))
    assert found, interrupted.explain()
    step = int(found.group(1))
    assert EVERY < step < STEPS and found.group(2) == f"runs/ctrl-c/checkpoints/{_name(step)}"
    assert os.readlink(checkpoints / "last.ckpt") == _name(step)  # the interrupted step is `last`
    assert {p.name for p in checkpoints.iterdir()} <= {"last.ckpt", _name(EVERY), _name(2 * EVERY), _name(step)}
    saved = torch.load(checkpoints / _name(step), map_location="cpu", weights_only=True)
    assert saved["global_step"] == step
    assert ref.tracking.only_run("ctrl-c").info.status == "KILLED"

    resumed = train_job.run(ref.cwd, args)
    assert resumed.returncode == 0, resumed.explain()
    assert f"resuming from {(checkpoints / _name(step)).resolve()}" in resumed.stderr, resumed.explain()
    run = ref.tracking.only_run("ctrl-c")
    assert run.info.status == "FINISHED"
    # Every step logged once (the interrupted step's metrics precede its checkpoint), equal to the reference.
    history = ref.tracking.history(run.info.run_id, "train/loss")
    assert history == {s: [loss] for s, loss in ref.losses.items()}
    _assert_same_weights(checkpoints / _name(STEPS), ref)


# ---------------------------------------------------------------------------------------------
# Non-finite values


def _poisoned_copy(ref: Reference, name: str, weight: str, index: tuple[int, ...], value: float) -> tuple[Path, dict]:
    """runs/<name>: a copy of the reference run; <name>.ckpt: its step-15 checkpoint with one bad value.
    Returns the poisoned file and a snapshot of the run's checkpoints."""
    shutil.copytree(ref.cwd / "runs/ref", ref.cwd / "runs" / name, symlinks=True)
    checkpoint = torch.load(ref.checkpoints(name) / _name(STEPS - EVERY), map_location="cpu", weights_only=True)
    checkpoint["state_dict"][f"model.{weight}"][index] = value
    poisoned = ref.cwd / f"{name}.ckpt"
    torch.save(checkpoint, poisoned)
    return poisoned, tree_snapshot(ref.checkpoints(name))


def _assert_failed_and_untouched(ref: Reference, name: str, before: dict, result: JobResult) -> None:
    assert result.returncode == 1, result.explain()
    # The checkpoints (and so `last`, the step-20 one) are byte-identical, and finite. config.yaml
    # and run.json are rewritten at every start: they name the new MLflow run.
    changes = [c for c in snapshot_diff(before, tree_snapshot(ref.checkpoints(name))) if "/converted" not in c]
    assert changes == [], changes
    _assert_finite(ref.checkpoints(name) / "last.ckpt")
    run = ref.tracking.only_run(name)  # a new MLflow run (tracking.continue_run=false)
    assert run.info.status == "FAILED"
    assert run.data.params["model.dim"] and run.data.params["run.name"] == name  # a new MLflow run gets the params
    assert ref.tracking.history(run.info.run_id, "train/loss") == {}  # step 16 was never taken


def test_a_nan_router_weight_stops_the_next_step_naming_the_router_logits(ref: Reference, train_job: TrainJob):
    poisoned, before = _poisoned_copy(ref, "nan-router", "layers.1.ffn.router.gate.weight", (2, 5), float("nan"))
    result = train_job.run(ref.cwd, ["train", "--resume", str(poisoned), "run.name=nan-router",
                                     "tracking.continue_run=false"])
    assert _last_line(result) == (
        f"error: non-finite loss at step {STEPS - EVERY + 1}: first non-finite value in layers.1.ffn.router output "
        "logits_TE (non-finite weights: layers.1.ffn.router.gate.weight); the weights were not updated; "
        f"the last checkpoint runs/nan-router/checkpoints/{_name(STEPS)} is intact"), result.explain()
    _assert_failed_and_untouched(ref, "nan-router", before, result)


def test_an_inf_expert_weight_under_expert_parallelism_stops_every_rank_naming_the_experts(
        ref: Reference, train_job: TrainJob):
    """Two processes, 2 of the 4 experts each: the poisoned expert lives on rank 0 only, yet both
    ranks stop at the same step (the flags are reduced) and rank 0 names it."""
    poisoned, before = _poisoned_copy(ref, "inf-ep", "layers.0.ffn.experts.w_in", (1, 3, 7), float("inf"))
    result = train_job.run(ref.cwd, ["train", "--resume", str(poisoned), "run.name=inf-ep",
                                     "tracking.continue_run=false", "trainer.devices=2", "parallel.ep=2",
                                     "trainer.batch_size=4"])
    assert _last_line(result).startswith(
        f"error: non-finite loss at step {STEPS - EVERY + 1}: first non-finite value in layers.0.ffn.experts output "
        "(non-finite weights: layers.0.ffn.experts.w_in); the weights were not updated"), result.explain()
    assert result.stderr.count("error: ") == 1, result.explain()  # rank 1 stopped silently
    _assert_failed_and_untouched(ref, "inf-ep", before, result)


def test_a_diverging_learning_rate_stops_before_the_bad_step_and_keeps_the_last_good_checkpoint(
        ref: Reference, train_job: TrainJob):
    args = train_job.debug_args(*OVERRIDES, "run.name=diverge", "optim.lr=1e4", "trainer.grad_clip=0",
                                "trainer.ckpt_every=1", "trainer.keep_checkpoints=50")
    result = train_job.run(ref.cwd, args)
    assert result.returncode == 1, result.explain()
    found = re.fullmatch(r"error: non-finite (loss|gradient) at step (\d+): (.+); the weights were not updated; "
                         r"the last checkpoint runs/diverge/checkpoints/step-(\d+)\.ckpt is intact", _last_line(result))
    assert found, result.explain()
    step, last = int(found.group(2)), int(found.group(4))
    assert 1 < step < STEPS and last == step - 1  # a checkpoint every step: the one before the bad step
    checkpoints = ref.checkpoints("diverge")
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [_name(s) for s in range(1, step)]
    assert os.readlink(checkpoints / "last.ckpt") == _name(step - 1)
    for path in checkpoints.glob("step-*"):
        _assert_finite(path)
    run = ref.tracking.only_run("diverge")
    assert run.info.status == "FAILED"
    assert sorted(ref.tracking.history(run.info.run_id, "train/loss")) == list(range(1, step))


# ---------------------------------------------------------------------------------------------
# Two trainings of the same run


def test_a_second_training_of_a_running_run_is_refused_and_a_killed_holder_frees_the_lock(
        ref: Reference, train_job: TrainJob):
    args = train_job.debug_args(*OVERRIDES, "run.name=locked")
    lock = ref.cwd / "runs/.locked.lock"
    first, first_err = _start(train_job, ref.cwd, args, "locked-first")
    _wait_for(first, first_err, (ref.checkpoints("locked") / _name(EVERY)).exists, "its first checkpoint")
    first.send_signal(signal.SIGSTOP)  # frozen mid-run, still holding the lock: nothing changes meanwhile
    try:
        before = tree_snapshot(ref.cwd)
        second = train_job.run(ref.cwd, args, timeout=120)
        assert second.returncode == 2, second.explain()
        assert second.stderr.strip() == (
            f"error: run locked is being trained by another process (PID {first.pid}, lock runs/.locked.lock): "
            "wait for it to finish or stop it, or give this run another run.name"), second.explain()
        assert snapshot_diff(before, tree_snapshot(ref.cwd)) == []
    finally:
        first.send_signal(signal.SIGCONT)
    finished = _finish(first, first_err)
    assert finished.returncode == 0, finished.explain()
    _assert_same_weights(ref.checkpoints("locked") / _name(STEPS), ref)
    assert ref.tracking.only_run("locked").info.status == "FINISHED"
    assert not lock.exists()  # removed at a normal exit

    third, third_err = _start(train_job, ref.cwd, args, "locked-third")  # the same command again
    _wait_for(third, third_err, lambda: _holder(lock) == third.pid, "the lock")
    third.kill()  # kill -9 while it holds the lock
    third.wait()
    assert _holder(lock) == third.pid  # the file stays...
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ...but the lock is free: this would raise


def _holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text())
    except (FileNotFoundError, ValueError):  # not there, or being written
        return None


# ---------------------------------------------------------------------------------------------
# Disk full


def _mount_tmpfs(folder: Path, megabytes: float) -> bool:
    folder.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k", "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint_and_resumes_after_freeing_space(
        ref: Reference, train_job: TrainJob, tmp_path: Path):
    args = train_job.debug_args(*OVERRIDES, "run.name=disk-full")
    checkpoints = ref.checkpoints("disk-full")
    if not _mount_tmpfs(checkpoints, 1.6 * CHECKPOINT_MB):  # room for one checkpoint, not two
        _file_size_limit_instead(train_job, tmp_path)
        return
    try:
        full = train_job.run(ref.cwd, args)
        assert full.returncode == 1, full.explain()
        assert _last_line(full) == (
            f"error: no space left on device writing checkpoint runs/disk-full/checkpoints/{_name(2 * EVERY)}: "
            f"free space or set trainer.keep_checkpoints lower; the previous checkpoint {_name(EVERY)} is intact")
        assert sorted(os.listdir(checkpoints)) == ["last.ckpt", _name(EVERY)]  # no temporary left
        assert os.readlink(checkpoints / "last.ckpt") == _name(EVERY)
        assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == EVERY
        assert ref.tracking.only_run("disk-full").info.status == "FAILED"

        subprocess.run(["mount", "-o", "remount,size=20m", str(checkpoints)], check=True)  # space freed
        resumed = train_job.run(ref.cwd, args)
        assert resumed.returncode == 0, resumed.explain()
        assert f"resuming from {(checkpoints / _name(EVERY)).resolve()}" in resumed.stderr, resumed.explain()
        _assert_same_weights(checkpoints / _name(STEPS), ref)
        run = ref.tracking.only_run("disk-full")
        assert run.info.status == "FINISHED"
        assert ref.tracking.last(run.info.run_id, "train/loss") == ref.losses
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)], check=False)


def _file_size_limit_instead(train_job: TrainJob, cwd: Path) -> None:
    """Without root (no tmpfs): a file-size limit smaller than one checkpoint (Python ignores
    SIGXFSZ, so the write fails with EFBIG). It holds for every file, so the first checkpoint fails."""
    limit = int(0.95 * CHECKPOINT_MB * 2**20)
    argv = train_job.argv(train_job.debug_args(*OVERRIDES, "run.name=disk-full"))
    done = subprocess.run(argv, cwd=cwd, env=train_job.env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    result = JobResult(argv, done.returncode, done.stdout, done.stderr, 0.0)
    assert result.returncode == 1, result.explain()
    assert _last_line(result) == (
        f"error: file too large writing checkpoint runs/disk-full/checkpoints/{_name(EVERY)}: "
        "raise the file-size limit (ulimit -f); no earlier checkpoint exists")
    assert os.listdir(cwd / "runs/disk-full/checkpoints") == []

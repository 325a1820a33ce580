"""Faults injected for real into debug trainings, each compared with one uninterrupted run (R):

1. `kill -9` of the same command at three moments (while computing, while writing a checkpoint,
   while logging to MLflow), rerun after each: the MLflow history and the final weights equal R's,
   every step logged exactly once.
2. The MLflow tracking server killed mid-run: training finishes (exit 0, one notice), and after a
   restart of the server `python -m pipelines sync` makes the run's history equal R's.

The moments are chosen from outside: polling the checkpoint folder for a temporary file, the
sqlite store for the steps logged, plus seeded random delays.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from app.checkpoint import latest_checkpoint
from app.tracking import PENDING_FILE
from tests.pipelines.conftest import (EXPERIMENT, JobResult, MlflowServer, Tracking, TrainJob, snapshot_diff,
                                      tree_snapshot)

STEPS, EVERY = 24, 4
FAULTS = (f"trainer.max_steps={STEPS}", f"trainer.ckpt_every={EVERY}", f"trainer.val_every={EVERY}",
          "trainer.log_every=1", "trainer.keep_checkpoints=2",
          "moe.router.jitter_eps=0.1")  # the router draws random numbers: a resume must replay them
TIMING_KEYS = ("perf/tokens_per_s", "perf/mfu")  # wall-clock measurements: same steps, not same values
POLL_S = 0.001  # a debug checkpoint takes milliseconds to write; this sees every one


@dataclass
class Reference:
    cwd: Path
    result: JobResult
    history: dict[str, dict[int, list[float]]]  # key -> step -> values
    weights: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_job: TrainJob) -> Reference:
    cwd = tmp_path_factory.mktemp("faults")
    result = train_job.run(cwd, train_job.debug_args(*FAULTS, "run.name=R"))
    assert result.returncode == 0, result.explain()
    tracking = Tracking(cwd)
    run = tracking.only_run("R")
    history = {key: tracking.history(run.info.run_id, key) for key in run.data.metrics}
    return Reference(cwd, result, history, _weights(cwd / "runs" / "R"))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    final = run_dir / "checkpoints" / f"step-{STEPS:07d}.ckpt"
    return torch.load(final, map_location="cpu", weights_only=True)["state_dict"]


def _histories_differ(reference: Reference, history: Callable[[str], dict[int, list[float]]]) -> list[str]:
    """Every metric key of R: the same steps, each logged once, with R's value (timings excepted)."""
    problems = []
    for key, ref in reference.history.items():
        got = history(key)
        if sorted(got) != sorted(ref):
            problems.append(f"{key}: steps {sorted(set(got) ^ set(ref))} are in only one of the runs")
        if twice := {s: v for s, v in got.items() if len(v) > 1}:
            problems.append(f"{key}: logged more than once at {twice}")
        if key not in TIMING_KEYS and (wrong := {s: (v, ref[s]) for s, v in got.items() if s in ref and v[0] != ref[s][0]}):
            problems.append(f"{key}: step -> (got, R) {wrong}")
    return problems


def _weights_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# ---------------------------------------------------------------------------------------------
# 1. kill -9 at three moments, the same command rerun after each


@dataclass
class Kill:
    moment: str
    stderr: str
    detail: str  # what the killer saw


def _kill_when(train_job: TrainJob, cwd: Path, args: list[str], moment: str,
               ready: Callable[[], str | None]) -> Kill:
    """Start the job and SIGKILL it as soon as `ready()` says what it saw; fail if it ended first."""
    stderr_path = cwd / f"killed-{moment}.stderr"
    proc = train_job.popen(cwd, args, stderr_path)
    deadline, detail = time.monotonic() + 240, None
    try:
        while detail is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            detail = ready()
            if detail is None:
                time.sleep(POLL_S)
        if detail is not None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None and detail is None:
            proc.kill()
        returncode = proc.wait()
    stderr = stderr_path.read_text()
    if detail is None or returncode != -signal.SIGKILL:
        pytest.fail(f"the kill {moment!r} did not land mid-training (exit {returncode}, saw {detail!r}):\n{stderr[-3000:]}")
    return Kill(moment, stderr, detail)


def _after_checkpoint(checkpoints: Path, delay_s: float) -> Callable[[], str | None]:
    """Computing: a seeded delay after the next checkpoint appears (the steps between two)."""
    before = {p.name for p in checkpoints.glob("step-*.ckpt")}
    seen: list[float] = []

    def ready() -> str | None:
        if not seen and {p.name for p in checkpoints.glob("step-*.ckpt")} - before:
            seen.append(time.monotonic())
        return f"{delay_s:.3f} s after a checkpoint" if seen and time.monotonic() - seen[0] >= delay_s else None

    return ready


def _checkpoint_being_written(checkpoints: Path) -> Callable[[], str | None]:
    """Writing a checkpoint: its temporary file (app/checkpoint.py AtomicCheckpointIO) exists; one
    left behind by an earlier kill does not count."""
    names = lambda: set(os.listdir(checkpoints)) if checkpoints.is_dir() else set()  # noqa: E731
    before = names()

    def ready() -> str | None:
        return next((n for n in names() - before if re.fullmatch(r"\.step-\d+\.ckpt\.tmp-\d+", n)), None)

    return ready


def _train_loss_step(db: Path, run_name: str) -> int:
    """The highest step of train/loss in the sqlite store (read-only; MLflow's own tables)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        row = conn.execute("SELECT MAX(m.step) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
                           "WHERE r.name = ? AND m.key = 'train/loss'", (run_name,)).fetchone()
    return row[0] or 0


def _logged_past(db: Path, run_name: str) -> Callable[[], str | None]:
    """Logging: the moment train/loss of a step between checkpoints lands in the store, its
    other keys (the MoE batch) possibly not yet. The step is new: above all a previous launch logged."""
    start = _train_loss_step(db, run_name)
    target = next(s for s in range(start + 1, STEPS) if s % EVERY == 2)

    def ready() -> str | None:
        step = _train_loss_step(db, run_name)
        return f"train/loss logged at step {step}" if step >= target else None

    return ready


def test_kill_9_at_three_moments_then_the_same_command_ends_like_the_uninterrupted_run(
        reference: Reference, train_job: TrainJob):
    cwd, rng = reference.cwd, random.Random(7)
    args = train_job.debug_args(*FAULTS, "run.name=K")
    checkpoints = cwd / "runs" / "K" / "checkpoints"
    kills = [_kill_when(train_job, cwd, args, "computing", _after_checkpoint(checkpoints, rng.uniform(0.05, 0.5)))]

    # Writing a checkpoint: the kill must leave the temporary file behind (it was cut mid-write);
    # if the rename won the race, the next checkpoint is tried.
    for _ in range(3):
        last_before = latest_checkpoint(checkpoints)
        kills.append(_kill_when(train_job, cwd, args, "checkpoint", _checkpoint_being_written(checkpoints)))
        if (checkpoints / kills[-1].detail).exists():
            break
    else:
        pytest.fail(f"three kills on a checkpoint temp file all landed after its rename: {[k.detail for k in kills]}")
    # A partial checkpoint is never `last` nor a checkpoint: the next launch resumes from the previous one.
    assert latest_checkpoint(checkpoints) == last_before

    kills.append(_kill_when(train_job, cwd, args, "logging", _logged_past(cwd / "mlflow.db", "K")))
    final = train_job.run(cwd, args)
    assert final.returncode == 0, final.explain()
    for previous, launch in zip(kills, [*kills[1:], None]):
        stderr = launch.stderr if launch else final.stderr
        assert "resuming from" in stderr, f"after the kill while {previous.moment}:\n{stderr[-3000:]}"
    assert re.search(rf"resuming from \S*/runs/K/checkpoints/{last_before.name}\n", kills[-1].stderr)  # after the cut write

    tracking = Tracking(cwd)
    run = tracking.only_run("K")  # every launch continued the same MLflow run
    assert run.info.status == "FINISHED"
    problems = _histories_differ(reference, lambda key: tracking.history(run.info.run_id, key))
    assert not problems, f"kills {[(k.moment, k.detail) for k in kills]}:\n" + "\n".join(problems)
    assert _weights_differ(reference.weights, _weights(cwd / "runs" / "K")) == []


# ---------------------------------------------------------------------------------------------
# 2. The tracking server killed mid-run, restarted after it, then `python -m pipelines sync`


def _sync(capfd, monkeypatch, cwd: Path, run: str) -> tuple[int, str, str]:
    """`python -m pipelines sync RUN` in this process (it trains nothing, and its imports are loaded)."""
    import warnings

    from pipelines.__main__ import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() replaces it
    capfd.readouterr()
    code = main(["sync", run])
    out, err = capfd.readouterr()
    return code, out, err


def test_a_killed_tracking_server_costs_nothing_once_synced(reference: Reference, train_job: TrainJob, tmp_path,
                                                             capfd, monkeypatch):
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path)
    try:
        server.start()
        cwd = reference.cwd
        args = train_job.debug_args(*FAULTS, "run.name=S", f"tracking.uri={server.uri}")
        checkpoints = cwd / "runs" / "S" / "checkpoints"
        with open(cwd / "outage.stderr", "w") as err:
            proc = subprocess.Popen(train_job.argv(args), cwd=cwd, env=train_job.env(), stdout=subprocess.DEVNULL,
                                    stderr=err)
        try:
            deadline = time.monotonic() + 240
            while not list(checkpoints.glob("step-*.ckpt")) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{(cwd / 'outage.stderr').read_text()}"
            server.stop(signal.SIGKILL)  # the whole server, workers included, with no goodbye
            killed = time.monotonic()
            pending = cwd / "runs" / "S" / PENDING_FILE
            while not pending.exists() and proc.poll() is None:
                time.sleep(0.01)
            code, _, early = _sync(capfd, monkeypatch, cwd, "S")  # too early: the training holds the run
            assert proc.poll() is None, "the run ended before sync could be tried during it: lengthen it"
            assert code == 2 and "error: run S is still training" in early, early
            returncode = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        after_kill_s = time.monotonic() - killed
        stderr = (cwd / "outage.stderr").read_text()
        assert returncode == 0, stderr[-3000:]
        # MLflow's own retries would stall each call for minutes; the run does not wait for a dead server.
        assert after_kill_s < 60, f"{after_kill_s:.0f} s from the server kill to the end of training"
        assert "done: 24 steps" in stderr
        notices = [line for line in stderr.splitlines() if "mlflow_pending.jsonl" in line]
        assert len(notices) == 2, notices  # the outage when it happened, and what to do at the end
        # (Connection refused; or reset when a call was in flight: the server may have stored it, sync checks)
        assert re.fullmatch(rf"warning: MLflow store {server.uri} is unreachable \([A-Za-z ]+\): training "
                            r"continues, its records are kept in runs/S/mlflow_pending.jsonl and sent when the store "
                            r"answers again", notices[0]), notices[0]
        assert re.fullmatch(rf"warning: \d+ MLflow records did not reach {server.uri} and are kept in "
                            r"runs/S/mlflow_pending.jsonl: once it is back, send them with `make sync RUN=runs/S` "
                            r"\(python -m pipelines sync runs/S\)", notices[1]), notices[1]
        assert pending.is_file()

        server.start()  # the same store, the same port
        code, out, err = _sync(capfd, monkeypatch, cwd, "S")  # the run's name finds its folder
        assert code == 0, err
        assert re.search(rf"synced runs/S to MLflow at {server.uri}: \d+ metric values sent \(\d+ already logged", out), out
        assert not pending.exists()
        code, out, err = _sync(capfd, monkeypatch, cwd, "runs/S")
        assert code == 0 and out.startswith("nothing to sync: runs/S has no mlflow_pending.jsonl"), (out, err)

        client = MlflowClient(server.uri)
        runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
        assert [r.info.run_name for r in runs] == ["S"]
        run = runs[0]
        assert run.info.status == "FINISHED"  # the end of the run was kept too

        def history(key: str) -> dict[int, list[float]]:
            by_step: dict[int, list[float]] = {}
            for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp):
                by_step.setdefault(m.step, []).append(m.value)
            return by_step

        problems = _histories_differ(reference, history)
        assert not problems, "\n".join(problems)
        assert run.data.params == Tracking(cwd).only_run("R").data.params | {"run.name": "S", "tracking.uri": server.uri}
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
            "checkpoints", "config.yaml", "data_split.json", "expert_load.png", "tokenizer.json"}
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
            f"checkpoints/step-{STEPS:07d}.ckpt"]
        assert _weights_differ(reference.weights, _weights(cwd / "runs" / "S")) == []
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# 3. `sync` refuses what it cannot do: one error line, exit 2, the kept records untouched

def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SYNC_BAD = {  # name -> (the run folder's run.json tracking_uri, the argument, what the error says)
    "unknown-run": ("", "nosuch", "no run folder nosuch (nor runs/nosuch) with a run.json"),
    "server-down": ("http://127.0.0.1:{port}", "runs/S", "Connection refused): start it and sync again (the records stay in "
                    "runs/S/mlflow_pending.jsonl), or pass --tracking-uri"),
    "no-store": ("sqlite:///{cwd}/nosuch.db", "S", "no MLflow store at sqlite:///"),
    "run-not-in-store": ("sqlite:///{cwd}/mlflow.db", "S", "MLflow run 0123abcd of runs/S/mlflow_pending.jsonl is not in"),
}


@pytest.mark.parametrize("name", list(SYNC_BAD))
def test_sync_refusals_are_one_line_and_keep_the_records(name: str, tmp_path, capfd, monkeypatch):
    uri, arg, message = SYNC_BAD[name]
    folder = tmp_path / "runs" / "S"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"mlflow_run_id": "0123abcd",
                                                 "tracking_uri": uri.format(port=_closed_port(), cwd=tmp_path)}))
    (folder / PENDING_FILE).write_text(json.dumps({"run_id": "0123abcd", "metrics": [["loss", 1.0, 1, 1]]}) + "\n")
    if name == "run-not-in-store":
        from mlflow.tracking import MlflowClient

        MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").create_experiment("exp")
    before = tree_snapshot(tmp_path)
    code, out, err = _sync(capfd, monkeypatch, tmp_path, arg)
    assert code == 2 and out == "", (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert snapshot_diff(before, tree_snapshot(tmp_path)) == []

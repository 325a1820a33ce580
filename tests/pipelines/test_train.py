"""End to end: `python -m pipelines train` as a subprocess, its MLflow run read back with MLflow's client.

References are independent of the code under test: the uninterrupted run for a killed-and-resumed
one, a fresh run's first losses for `run.resume=false`, a hand-written validation loop over the
raw val.bin for the logged val/loss, and the git repository for the commit tag.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.pipelines.conftest import REPO, JobResult, TrainJob, Tracking, sha256

# ---------------------------------------------------------------------------------------------
# 1. One debug run, end to end

E2E_NAME, E2E_STEPS = "e2e", 12
E2E_OVERRIDES = ("trainer.max_steps=12", "trainer.ckpt_every=4", "trainer.val_every=4", "trainer.log_every=2",
                 "trainer.keep_checkpoints=2", f"run.name={E2E_NAME}")
MOE_LAYER_KEYS = ("load_max_over_mean", "load_cv", "router_entropy", "dropped_frac", "aux_loss", "z_loss")
MOE_TOTAL_KEYS = ("moe/dropped_frac", "moe/load_max_over_mean", "moe/aux_loss", "moe/z_loss")


@dataclass
class Run:
    cwd: Path
    result: JobResult
    tracking: Tracking

    @property
    def checkpoints(self) -> Path:
        return self.cwd / "runs" / E2E_NAME / "checkpoints"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, train_job: TrainJob) -> Run:
    cwd = tmp_path_factory.mktemp("e2e")
    result = train_job.run(cwd, train_job.debug_args(*E2E_OVERRIDES))
    assert result.returncode == 0, result.explain()
    return Run(cwd, result, Tracking(cwd))


def test_debug_run_is_one_finished_mlflow_run_with_tags_and_params(e2e: Run):
    run = e2e.tracking.only_run()  # the whole experiment holds this one run
    assert run.info.run_name == E2E_NAME
    assert run.info.status == "FINISHED"
    assert run.data.tags["kind"] == "moe"
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", run.data.tags["git_commit"])
    # The commit of this repository (HEAD then, an ancestor of HEAD now if someone committed since).
    sha = run.data.tags["git_commit"].removesuffix("-dirty")
    assert subprocess.run(["git", "merge-base", "--is-ancestor", sha, "HEAD"], cwd=REPO).returncode == 0
    params = run.data.params
    assert params["moe.num_experts"] == "4" and params["model.dim"] == "64"  # conf/debug.yaml
    assert params["trainer.max_steps"] == str(E2E_STEPS)  # the override beat the recipe's 30
    assert params["run.name"] == E2E_NAME


def test_debug_run_logs_every_metric_at_the_configured_steps(e2e: Run):
    from moe import TransformerConfig

    run = e2e.tracking.only_run()
    params = run.data.params
    layer_ids = TransformerConfig(n_layers=int(params["model.n_layers"]), moe_first_dense=int(params["model.moe_first_dense"]),
                                  moe_every=int(params["model.moe_every"])).moe_layer_ids
    assert layer_ids, "the debug model has MoE layers"
    logged_layers = {int(k.split("/")[1].removeprefix("layer_")) for k in run.data.metrics if k.startswith("moe/layer_")}
    assert logged_layers == set(layer_ids)
    per_layer = [f"moe/layer_{i}/{k}" for i in layer_ids for k in MOE_LAYER_KEYS]
    every_log = ["train/loss", "train/ce", "lr", *per_layer, *MOE_TOTAL_KEYS]
    missing = [k for k in [*every_log, "val/loss", "val/ppl", "val/bits_per_byte", "perf/tokens_per_s", "perf/mfu"]
               if k not in run.data.metrics]
    assert not missing, f"metrics never logged: {missing}"
    log_steps = list(range(2, E2E_STEPS + 1, 2))  # log_every=2
    for key in every_log:
        assert sorted(e2e.tracking.history(run.info.run_id, key)) == log_steps, key
    for key in ("val/loss", "val/ppl", "val/bits_per_byte"):
        assert sorted(e2e.tracking.history(run.info.run_id, key)) == [4, 8, 12], key  # val_every=4
    for key in ("perf/tokens_per_s", "perf/mfu"):
        values = e2e.tracking.history(run.info.run_id, key)
        assert set(values) <= set(log_steps) and values, key
        assert all(v > 0 for vs in values.values() for v in vs), key
    for step, (loss,) in e2e.tracking.history(run.info.run_id, "train/loss").items():
        ce = e2e.tracking.history(run.info.run_id, "train/ce")[step][0]
        assert math.isfinite(loss) and loss >= ce > 0  # loss = ce + non-negative MoE losses


def test_val_ppl_is_exp_of_val_loss_at_every_step(e2e: Run):
    run_id = e2e.tracking.only_run().info.run_id
    loss, ppl = e2e.tracking.last(run_id, "val/loss"), e2e.tracking.last(run_id, "val/ppl")
    assert loss.keys() == ppl.keys()
    for step in loss:
        assert ppl[step] == pytest.approx(math.exp(loss[step]), rel=1e-9), step


def test_debug_run_logs_config_tokenizer_plot_split_and_final_checkpoint(e2e: Run, corpus: Path, tmp_path):
    from tokenizers import Tokenizer

    from pipelines.config import config_from_yaml

    run = e2e.tracking.only_run()
    run_id = run.info.run_id
    paths = e2e.tracking.artifact_paths(run_id)
    assert {"config.yaml", "tokenizer.json", "expert_load.png", "data_split.json", "checkpoints"} <= paths
    assert e2e.tracking.artifact_paths(run_id, "checkpoints") == {"checkpoints/step-0000012.ckpt"}

    config = config_from_yaml(e2e.tracking.download(run_id, "config.yaml", tmp_path).read_text())
    assert (config.trainer.max_steps, config.trainer.log_every, config.run.name) == (E2E_STEPS, 2, E2E_NAME)
    tokenizer = Tokenizer.from_file(str(e2e.tracking.download(run_id, "tokenizer.json", tmp_path)))
    assert config.model.vocab_size == tokenizer.get_vocab_size() == int(run.data.params["model.vocab_size"])
    assert tokenizer.get_vocab_size() <= 300
    split = json.loads(e2e.tracking.download(run_id, "data_split.json", tmp_path).read_text())
    # val_fraction 0.05 of 15 documents rounds to one: the last file in sorted order is held out.
    assert split["val_documents"] == [str(sorted(corpus.glob("*.txt"))[-1])]
    assert split["cache_key"] == run.data.params["data.cache_key"]
    png = e2e.tracking.download(run_id, "expert_load.png", tmp_path).read_bytes()
    assert png.startswith(b"\x89PNG")
    logged = e2e.tracking.download(run_id, "checkpoints/step-0000012.ckpt", tmp_path)
    assert sha256(logged) == sha256(e2e.checkpoints / "step-0000012.ckpt")


def test_checkpoints_on_disk_last_points_at_the_final_one_and_old_ones_are_pruned(e2e: Run):
    assert os.path.islink(e2e.checkpoints / "last.ckpt")
    assert (e2e.checkpoints / "last.ckpt").resolve() == (e2e.checkpoints / "step-0000012.ckpt").resolve()
    # Saved at 4, 8, 12; keep_checkpoints=2 leaves the newest two and no temporary file.
    assert sorted(p.name for p in e2e.checkpoints.iterdir()) == ["last.ckpt", "step-0000008.ckpt", "step-0000012.ckpt"]
    assert torch.load(e2e.checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == E2E_STEPS


def test_checkpoint_alone_rebuilds_the_model_and_its_logged_val_loss(e2e: Run, data_cache: Path):
    from moe import Transformer
    from pipelines.config import config_from_yaml

    checkpoint = torch.load(e2e.checkpoints / "step-0000012.ckpt", map_location="cpu", weights_only=True)
    config = config_from_yaml(checkpoint["experiment_config"])
    model = Transformer(config.model, config.moe)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    assert all(k.startswith("model.") for k in checkpoint["state_dict"])
    model.load_state_dict(state, strict=True)

    # Independent validation loop: the first val_batches * batch_size non-overlapping windows of
    # seq_len + 1 tokens of val.bin, in batches of batch_size (capacity is per batch), eval mode.
    run = e2e.tracking.only_run()
    shard = data_cache / run.data.params["data.cache_key"]
    ids = np.fromfile(shard / "val.bin", dtype=json.loads((shard / "meta.json").read_text())["dtype"]).astype(np.int64)
    B, T = config.trainer.batch_size, config.trainer.seq_len
    count = min(config.trainer.val_batches * B, (len(ids) - 1) // T)
    windows = torch.from_numpy(np.stack([ids[i * T : i * T + T + 1] for i in range(count)]))
    model.eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(B):
            logits, _ = model(batch[:, :-1])
            nll += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
            tokens += batch[:, 1:].numel()
    logged = e2e.tracking.last(run.info.run_id, "val/loss")[E2E_STEPS]
    assert nll / tokens == pytest.approx(logged, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# 2-3. Kill and resume: equal to the uninterrupted run, in the same MLflow run; extend a run.

KILL_STEPS, KILL_CKPT_EVERY = 48, 8
KILL_OVERRIDES = (f"trainer.max_steps={KILL_STEPS}", f"trainer.ckpt_every={KILL_CKPT_EVERY}",
                  f"trainer.val_every={KILL_CKPT_EVERY}", "trainer.log_every=1", "trainer.keep_checkpoints=2",
                  "moe.router.jitter_eps=0.1")  # the router draws random numbers: resume must replay them
EXTEND_STEPS = KILL_STEPS + 6


@dataclass
class KillResume:
    cwd: Path
    reference: JobResult  # run A, uninterrupted
    killed_at: Path  # the checkpoint a resume should pick up after the kill
    first_stderr: str
    first_val_steps: set[int]  # steps whose val/loss the killed process logged
    resumed_from_step: int | None  # from the resumed launch's "resuming from ..." line
    resumed: JobResult  # run B's second launch, the exact same command
    tracking: Tracking

    def checkpoints(self, name: str) -> Path:
        return self.cwd / "runs" / name / "checkpoints"


def _kill_after_first_checkpoint(train_job: TrainJob, cwd: Path, args: list[str], checkpoints: Path) -> tuple[Path, str]:
    """Start the job, SIGKILL it as soon as a step checkpoint exists; the checkpoint and stderr."""
    stderr_path = cwd / "killed.stderr"
    proc = train_job.popen(cwd, args, stderr_path)
    deadline, seen = time.monotonic() + 240, []
    try:
        while not seen:
            if proc.poll() is not None:
                pytest.fail(f"run B exited ({proc.returncode}) before writing a checkpoint:\n{stderr_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("run B wrote no checkpoint within 240 s")
            seen = sorted(checkpoints.glob("step-*.ckpt"))
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        returncode = proc.wait()
    stderr = stderr_path.read_text()
    stderr_path.unlink()
    if returncode != -signal.SIGKILL:
        pytest.fail(f"run B ended by itself (exit {returncode}) before the kill: lengthen the run "
                    f"(trainer.max_steps) so the kill lands mid-training\n{stderr[-3000:]}")
    newest = sorted(checkpoints.glob("step-*.ckpt"))[-1]
    assert newest.name < f"step-{KILL_STEPS:07d}.ckpt", f"B was killed after its final checkpoint {newest}"
    last = checkpoints / "last.ckpt"  # what a resume picks: `last` if it was swapped in, else the newest file
    return (last.resolve() if last.exists() else newest), stderr


@pytest.fixture(scope="module")
def kill_resume(tmp_path_factory, train_job: TrainJob) -> KillResume:
    cwd = tmp_path_factory.mktemp("kill-resume")
    reference = train_job.run(cwd, train_job.debug_args(*KILL_OVERRIDES, "run.name=A"))
    assert reference.returncode == 0, reference.explain()
    args = train_job.debug_args(*KILL_OVERRIDES, "run.name=B")
    killed_at, first_stderr = _kill_after_first_checkpoint(train_job, cwd, args, cwd / "runs" / "B" / "checkpoints")
    tracking = Tracking(cwd)
    first_val_steps = set(tracking.history(tracking.only_run("B").info.run_id, "val/loss"))
    resumed = train_job.run(cwd, args)
    found = re.search(r"resuming from \S*step-(\d{7})\.ckpt", resumed.stderr)
    resumed_from = int(found.group(1)) if found else None
    return KillResume(cwd, reference, killed_at, first_stderr, first_val_steps, resumed_from, resumed, tracking)


def test_killed_run_resumes_from_its_checkpoint_in_the_same_mlflow_run(kill_resume: KillResume):
    resumed = kill_resume.resumed
    assert resumed.returncode == 0, resumed.explain()
    assert "resuming from" not in kill_resume.first_stderr
    assert "resuming from" in resumed.stderr, resumed.explain()
    assert kill_resume.resumed_from_step == int(kill_resume.killed_at.stem.removeprefix("step-")), resumed.explain()
    b = kill_resume.tracking.only_run("B")  # the resumed launch did not open a second run
    assert b.info.status == "FINISHED"
    assert len(kill_resume.tracking.runs()) == 2  # A and B
    final = torch.load(kill_resume.checkpoints("B") / f"step-{KILL_STEPS:07d}.ckpt", map_location="cpu", weights_only=True)
    assert final["mlflow_run_id"] == b.info.run_id
    assert final["global_step"] == KILL_STEPS


def _a_and_b(kill_resume: KillResume, key: str) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
    """Every value of `key` that A and B logged, by step, up to KILL_STEPS (the extension test may
    have added later steps to B)."""
    tracking = kill_resume.tracking
    a = tracking.history(tracking.only_run("A").info.run_id, key)
    b = tracking.history(tracking.only_run("B").info.run_id, key)
    return ({s: v for s, v in a.items() if s <= KILL_STEPS}, {s: v for s, v in b.items() if s <= KILL_STEPS})


@pytest.mark.parametrize("key", ["train/loss", "train/ce", "lr", "moe/layer_0/load_cv", "moe/layer_1/router_entropy"])
def test_killed_and_resumed_run_logs_exactly_what_the_uninterrupted_run_logs(kill_resume: KillResume, key: str):
    a, b = _a_and_b(kill_resume, key)
    assert sorted(a) == list(range(1, KILL_STEPS + 1))  # log_every=1
    assert sorted(b) == sorted(a)
    # The steps between the checkpoint and the kill were replayed, but each is logged once, with A's value.
    mismatches = {s: (a[s], b[s]) for s in a if b[s] != a[s]}
    assert not mismatches, f"{key}: step -> (A, B) differ or repeat: {mismatches}"


@pytest.mark.parametrize("key", ["val/loss", "val/ppl", "val/bits_per_byte"])
def test_killed_and_resumed_run_validates_exactly_like_the_uninterrupted_run(kill_resume: KillResume, key: str):
    a, b = _a_and_b(kill_resume, key)
    assert sorted(a) == list(range(KILL_CKPT_EVERY, KILL_STEPS + 1, KILL_CKPT_EVERY))  # val_every
    # The validation of the step B resumed from may be missing: see the next test.
    assert set(a) - set(b) <= {kill_resume.resumed_from_step} and set(b) <= set(a)
    mismatches = {s: (a[s], b[s]) for s in b if any(v != a[s][-1] for v in b[s])}
    assert not mismatches, f"{key}: step -> (A, B) differ: {mismatches}"


def test_a_run_killed_during_validation_validates_that_step_after_resuming(kill_resume: KillResume):
    step = kill_resume.resumed_from_step
    if step is None:
        pytest.skip("B did not resume: see test_killed_run_resumes_from_its_checkpoint_in_the_same_mlflow_run")
    if step % KILL_CKPT_EVERY or step == KILL_STEPS:
        pytest.skip(f"B resumed from step {step}, not a mid-run validation step")
    if step in kill_resume.first_val_steps:
        pytest.skip(f"the kill landed after the validation of step {step}: the case did not happen")
    a, b = _a_and_b(kill_resume, "val/loss")
    assert step in b, f"B never logged val/loss at step {step} (A: {a[step]})"


def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(kill_resume: KillResume):
    name = f"step-{KILL_STEPS:07d}.ckpt"
    a = torch.load(kill_resume.checkpoints("A") / name, map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(kill_resume.checkpoints("B") / name, map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_resume_flag_extends_a_run_with_the_checkpoint_config_in_the_same_mlflow_run(
        kill_resume: KillResume, train_job: TrainJob):
    """`make train RESUME=<ckpt>`: only the checkpoint and one override on the command line."""
    assert kill_resume.resumed.returncode == 0, kill_resume.resumed.explain()
    tracking = kill_resume.tracking
    run_id = tracking.only_run("B").info.run_id
    ckpt = Path("runs/B/checkpoints") / f"step-{KILL_STEPS:07d}.ckpt"
    result = train_job.run(kill_resume.cwd, ["train", "--resume", str(ckpt), f"trainer.max_steps={EXTEND_STEPS}"])
    assert result.returncode == 0, result.explain()
    assert f"resuming from {ckpt}" in result.stderr, result.explain()

    b = tracking.only_run("B")
    assert b.info.run_id == run_id and b.info.status == "FINISHED"
    # log_every=1 and jitter come from the checkpoint (debug.yaml says log_every=5, the default 10).
    config = yaml.safe_load((kill_resume.cwd / "runs/B/config.yaml").read_text())
    assert (config["trainer"]["max_steps"], config["trainer"]["log_every"]) == (EXTEND_STEPS, 1)
    assert config["moe"]["router"]["jitter_eps"] == 0.1
    assert sorted(tracking.history(run_id, "train/loss")) == list(range(1, EXTEND_STEPS + 1))
    checkpoints = kill_resume.checkpoints("B")
    assert (checkpoints / "last.ckpt").resolve().name == f"step-{EXTEND_STEPS:07d}.ckpt"
    final = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert (final["global_step"], final["mlflow_run_id"]) == (EXTEND_STEPS, run_id)


# ---------------------------------------------------------------------------------------------
# 4. run.resume=false: the old run is kept, a new one starts from step 0


def test_resume_false_archives_the_old_run_and_starts_a_fresh_mlflow_run(e2e: Run, train_job: TrainJob, tmp_path):
    shutil.copytree(e2e.cwd / "runs", tmp_path / "runs", symlinks=True)
    old_sums = {p.name: sha256(p) for p in e2e.checkpoints.glob("step-*.ckpt")}
    old_run_id = e2e.tracking.only_run().info.run_id
    steps = 2
    result = train_job.run(tmp_path, train_job.debug_args(*E2E_OVERRIDES, "run.resume=false", f"trainer.max_steps={steps}"))
    assert result.returncode == 0, result.explain()
    assert "resuming from" not in result.stderr

    archived = [p for p in (tmp_path / "runs").iterdir() if p.name != E2E_NAME]
    assert len(archived) == 1 and re.fullmatch(rf"{E2E_NAME}-\d{{8}}-\d{{6}}", archived[0].name), archived
    kept = archived[0] / "checkpoints"
    assert {p.name: sha256(p) for p in kept.glob("step-*.ckpt")} == old_sums  # byte-identical
    assert (kept / "last.ckpt").resolve() == (kept / "step-0000012.ckpt").resolve()
    assert json.loads((archived[0] / "run.json").read_text())["mlflow_run_id"] == old_run_id

    fresh = tmp_path / "runs" / E2E_NAME / "checkpoints"
    assert sorted(p.name for p in fresh.iterdir()) == ["last.ckpt", f"step-{steps:07d}.ckpt"]
    new_run = Tracking(tmp_path).only_run(E2E_NAME)
    checkpoint = torch.load(fresh / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == steps
    assert checkpoint["mlflow_run_id"] == new_run.info.run_id != old_run_id
    # Started from step 0 with the same seed and data: its step-2 loss is the old run's step-2 loss
    # (both in warmup, where the LR does not depend on max_steps).
    new_loss = Tracking(tmp_path).history(new_run.info.run_id, "train/loss")
    assert sorted(new_loss) == [2]
    assert new_loss[2] == [e2e.tracking.last(old_run_id, "train/loss")[2]]


# ---------------------------------------------------------------------------------------------
# 5. A corpus file with no text is skipped with a warning, not an error


def test_an_empty_file_among_good_ones_is_skipped_with_a_warning(train_job: TrainJob, corpus: Path, tmp_path):
    folder = tmp_path / "corpus"
    shutil.copytree(corpus, folder)
    empty = folder / "1795-Empty-1.txt"
    empty.write_text("")
    args = train_job.debug_args("trainer.max_steps=2", "run.name=with-empty", corpus=folder, cache_dir="data")
    result = train_job.run(tmp_path, args)
    assert result.returncode == 0, result.explain()
    assert f"{empty}: no text, skipped" in result.stderr, result.explain()
    run = Tracking(tmp_path).only_run("with-empty")
    assert run.info.status == "FINISHED"
    meta = json.loads((tmp_path / "data" / run.data.params["data.cache_key"] / "meta.json").read_text())
    names = meta["splits"]["train"]["names"] + meta["splits"]["val"]["names"]
    assert str(empty) not in names and len(names) == len(list(corpus.glob("*.txt")))


# ---------------------------------------------------------------------------------------------
# 6. `make train RESUME=<ckpt> ARGS=...` (bad inputs: tests/pipelines/test_bad_inputs.py)


def test_make_train_resume_with_args_extends_the_run(e2e: Run, train_job: TrainJob, tmp_path):
    """`make train RESUME=<ckpt> ARGS=trainer.max_steps=14` expands to this command line."""
    shutil.copytree(e2e.cwd / "runs", tmp_path / "runs", symlinks=True)
    ckpt = "runs/e2e/checkpoints/step-0000012.ckpt"
    result = train_job.run(tmp_path, ["train", str(REPO / "conf" / "debug.yaml"), "--resume", ckpt,
                                      "trainer.max_steps=14", "tracking.enabled=false"])
    assert result.returncode == 0, result.explain()
    assert f"resuming from {ckpt}" in result.stderr
    assert (tmp_path / "runs/e2e/checkpoints/last.ckpt").resolve().name == "step-0000014.ckpt"

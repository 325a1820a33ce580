"""Several processes on gloo (CPU): FSDP2 and expert parallelism through `python -m pipelines train`.

References, independent of the parallel code under test:
- one process on the same global batch (2 processes x 8 sequences read exactly what 1 x 16 reads)
  for the losses and routing metrics of the first steps;
- the uninterrupted 1-process run for a checkpoint resharded either way (2 -> 1, 1 -> 2 processes);
- the 1-process run's step-4 weights for every expert a distributed checkpoint holds, and a fresh
  1-process `moe.Transformer` for the names and full shapes it must hold;
- the parameter count of that Transformer for the logged parameter + optimizer memory.

Every run is a subprocess (Lightning launches the second process itself); all runs of this module
share one working folder, so one MLflow store. Metrics are read into plain dicts right after each
run: a `--resume` continues the MLflow run its checkpoint names and logs over its later steps.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.pipelines.conftest import JobResult, TrainJob, Tracking, sha256, snapshot_diff, tree_snapshot

KEYS = ("train/loss", "moe/dropped_frac", "moe/layer_0/load_max_over_mean", "mem/param_optim_mb_per_rank")
LOG_EVERY = ("trainer.log_every=1",)
ONE = ("trainer.devices=1", "parallel.ep=1", "trainer.batch_size=16")  # the reference: 1 x 16 sequences
EP2 = ("trainer.devices=2", "parallel.ep=2", "trainer.batch_size=8")  # 2 x 8: 2 of the 4 experts per rank
FSDP = ("trainer.devices=2", "parallel.ep=1", "trainer.batch_size=8")  # every rank holds a shard of everything
STEPS, CKPT_EVERY, SHORT = 8, 4, 5  # the reference runs 8 steps; the parallel runs 5 (checkpoint at 4)
# The losses of steps 1..5 do not depend on max_steps: the updates before them all fall in the
# 5-step warmup (conf/debug.yaml), which ignores the total. Later steps drift apart (float
# reduction order, and a capacity drop flips on a tiny difference): compare few steps.
COMPARED = range(1, SHORT + 1)
LOSS_TOL = 1e-4
ROUTING_TOL = 1e-6  # capacity decisions are global under EP: equal routing, equal counts


@dataclass
class Finished:
    name: str
    cwd: Path
    result: JobResult
    run_id: str  # the MLflow run it logged into (runs/<name>/run.json)
    metrics: dict[str, dict[int, float]]  # key -> step -> last value, read right after the run

    @property
    def checkpoints(self) -> Path:
        return self.cwd / "runs" / self.name / "checkpoints"


def _train(job: TrainJob, cwd: Path, name: str, *overrides: str, resume: Path | None = None) -> Finished:
    if resume is None:
        args = job.debug_args(*LOG_EVERY, *overrides, f"run.name={name}")
    else:  # the checkpoint's own config (corpus, cache, log_every=1), then the overrides
        args = ["train", "--resume", str(resume), *overrides, f"run.name={name}"]
    result = job.run(cwd, args)
    assert result.returncode == 0, result.explain()
    run_id = json.loads((cwd / "runs" / name / "run.json").read_text())["mlflow_run_id"]
    tracking = Tracking(cwd)
    return Finished(name, cwd, result, run_id, {key: tracking.last(run_id, key) for key in KEYS})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parallel")


@pytest.fixture(scope="module")
def one(workdir: Path, train_job: TrainJob) -> Finished:
    """The reference: 1 process, batch 16, 8 steps, file checkpoints at steps 4 and 8."""
    return _train(train_job, workdir, "one", *ONE, f"trainer.max_steps={STEPS}", f"trainer.ckpt_every={CKPT_EVERY}")


@pytest.fixture(scope="module")
def ep2(workdir: Path, train_job: TrainJob) -> Finished:
    """2 processes, ep=2: folder checkpoints at steps 4 and 5."""
    return _train(train_job, workdir, "ep2", *EP2, f"trainer.max_steps={SHORT}", f"trainer.ckpt_every={CKPT_EVERY}")


@pytest.fixture(scope="module")
def fsdp(workdir: Path, train_job: TrainJob) -> Finished:
    return _train(train_job, workdir, "fsdp", *FSDP, f"trainer.max_steps={SHORT}")


def _step_ckpt(run: Finished, step: int) -> Path:
    return run.checkpoints / f"step-{step:07d}.ckpt"


# ---------------------------------------------------------------------------------------------
# 1. The same global batch gives the same steps on 1 or 2 processes


def _assert_same_steps(run: Finished, ref: Finished, key: str, tol: float, steps=COMPARED) -> None:
    got, want = run.metrics[key], ref.metrics[key]
    assert set(steps) <= set(got) and set(steps) <= set(want), f"{key}: steps {sorted(got)} vs {sorted(want)}"
    diffs = {s: abs(got[s] - want[s]) for s in steps}
    assert max(diffs.values()) <= tol, (
        f"{key} of {run.name} vs {ref.name} (tolerance {tol}):\n"
        + "\n".join(f"  step {s}: {got[s]:.8f} vs {want[s]:.8f} (diff {diffs[s]:.2e})" for s in steps)
    )


@pytest.mark.parametrize("key, tol", [("train/loss", LOSS_TOL), ("moe/dropped_frac", ROUTING_TOL),
                                      ("moe/layer_0/load_max_over_mean", ROUTING_TOL)])
def test_expert_parallel_steps_equal_one_process_on_the_same_global_batch(ep2: Finished, one: Finished, key, tol):
    _assert_same_steps(ep2, one, key, tol)


def test_the_compared_steps_drop_assignments(one: Finished):
    """Otherwise the dropped_frac comparison above would only compare zeros."""
    dropped = one.metrics["moe/dropped_frac"]
    assert any(dropped[s] > 0 for s in COMPARED), dropped


def test_pure_fsdp_losses_equal_one_process_on_the_same_global_batch(fsdp: Finished, one: Finished):
    _assert_same_steps(fsdp, one, "train/loss", LOSS_TOL)


@pytest.mark.parametrize("key", ["moe/dropped_frac", "moe/layer_0/load_max_over_mean"])
def test_pure_fsdp_first_step_routes_like_one_process(fsdp: Finished, one: Finished, key):
    """Only the first step (the same weights): with ep=1 every rank holds every expert and applies
    capacity, and the load-balancing loss, to its own tokens (README: "the load-balancing loss uses
    the ep group's counts"), so the next weights differ a little and a few of the 4096 assignments
    per step are routed or dropped differently (measured: up to 2)."""
    _assert_same_steps(fsdp, one, key, ROUTING_TOL, steps=[1])


# ---------------------------------------------------------------------------------------------
# 2. Per-rank memory


def test_one_process_memory_is_parameters_plus_two_adam_moments(one: Finished):
    """The 1-process value, against the parameter count of the model: 3 float32 copies
    (weights, exp_avg, exp_avg_sq) plus one float32 `step` per parameter tensor."""
    from moe import Transformer
    from pipelines.config import config_from_yaml
    from app.checkpoint import checkpoint_config

    config = config_from_yaml(checkpoint_config(_step_ckpt(one, CKPT_EVERY)))
    params = list(Transformer(config.model, config.moe).parameters())
    want = (3 * sum(p.numel() for p in params) * 4 + 4 * len(params)) / 2**20
    got = one.metrics["mem/param_optim_mb_per_rank"][SHORT]
    assert got == pytest.approx(want, rel=1e-3)


def test_expert_parallel_halves_parameter_and_optimizer_memory_per_rank(ep2: Finished, one: Finished):
    """FSDP shards everything over the 2 ranks: the largest rank holds about half (the value is the
    max over ranks, so never less than half of the total)."""
    mine, ref = ep2.metrics["mem/param_optim_mb_per_rank"][SHORT], one.metrics["mem/param_optim_mb_per_rank"][SHORT]
    assert 0.49 <= mine / ref <= 0.55, f"{mine:.4f} MiB per rank vs {ref:.4f} MiB on one process"


# ---------------------------------------------------------------------------------------------
# 3. Resharding: a checkpoint of 2 processes resumes on 1, and one of 1 process on 2


@pytest.fixture(scope="module")
def ep2_on_one(ep2: Finished, train_job: TrainJob) -> Finished:
    folder = _step_ckpt(ep2, CKPT_EVERY)
    assert folder.is_dir(), f"no distributed checkpoint folder {folder}"
    return _train(train_job, ep2.cwd, "ep2-on-one", *ONE, f"trainer.max_steps={STEPS}", resume=folder)


@dataclass
class OneOnTwo:
    run: Finished
    before: dict  # snapshot of runs/one before the resume
    file_sha: str  # of the step-4 file before the resume


@pytest.fixture(scope="module")
def one_on_two(one: Finished, train_job: TrainJob) -> OneOnTwo:
    path = _step_ckpt(one, CKPT_EVERY)
    assert path.is_file(), f"no checkpoint file {path}"
    before, file_sha = tree_snapshot(one.cwd / "runs" / one.name), sha256(path)
    run = _train(train_job, one.cwd, "one-on-two", *EP2, resume=path)
    return OneOnTwo(run, before, file_sha)


def test_distributed_checkpoint_resumes_on_one_process_in_the_mlflow_run_it_names(ep2_on_one: Finished, ep2: Finished):
    assert ep2_on_one.run_id == ep2.run_id
    assert "resuming from" in ep2_on_one.result.stderr, ep2_on_one.result.explain()
    assert sorted(ep2_on_one.metrics["train/loss"]) == list(range(1, STEPS + 1))  # ep2's 1..5, then 5..8
    # Resuming a folder keeps the distributed layout (ModelParallelStrategy on one process).
    assert (_step_ckpt(ep2_on_one, STEPS) / "meta.pt").is_file()


def test_distributed_checkpoint_resumed_on_one_process_continues_like_the_uninterrupted_run(
    ep2_on_one: Finished, one: Finished
):
    _assert_same_steps(ep2_on_one, one, "train/loss", LOSS_TOL, steps=range(CKPT_EVERY + 1, STEPS + 1))


def test_file_checkpoint_resumes_on_two_processes_through_a_converted_folder(one_on_two: OneOnTwo, one: Finished):
    run = one_on_two.run
    assert run.run_id == one.run_id  # the MLflow run the checkpoint names
    assert "converting" in run.result.stderr, run.result.explain()
    # Converted once, into the resuming run's folder (pipelines/train.py: _as_distributed).
    converted = run.checkpoints / "converted" / f"step-{CKPT_EVERY:07d}.ckpt"
    assert converted.is_dir() and (converted / "meta.pt").is_file(), sorted(map(str, run.checkpoints.rglob("*")))
    assert _step_ckpt(run, STEPS).is_dir()  # two processes write a distributed checkpoint
    # The original run is untouched: the file it resumed from, byte for byte, and everything around it.
    assert sha256(_step_ckpt(one, CKPT_EVERY)) == one_on_two.file_sha
    assert snapshot_diff(one_on_two.before, tree_snapshot(one.cwd / "runs" / one.name)) == []


def test_file_checkpoint_resumed_on_two_processes_continues_like_the_uninterrupted_run(
    one_on_two: OneOnTwo, one: Finished
):
    _assert_same_steps(one_on_two.run, one, "train/loss", LOSS_TOL, steps=range(CKPT_EVERY + 1, STEPS + 1))


# ---------------------------------------------------------------------------------------------
# 4. A distributed checkpoint holds every rank's experts, under the 1-process names and shapes


def _load_distributed(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The folder's weights loaded without a process group into full-size tensors built from a
    1-process Transformer of the checkpoint's config (NaN first: whatever is not loaded shows)."""
    import torch.distributed.checkpoint as dcp

    from app.checkpoint import checkpoint_config
    from moe import Transformer
    from pipelines.config import config_from_yaml

    config = config_from_yaml(checkpoint_config(folder))
    reference = Transformer(config.model, config.moe).state_dict()
    state = {"state_dict": {f"model.{k}": torch.full_like(v, math.nan) for k, v in reference.items()}}
    metadata = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": that is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return state["state_dict"], metadata


@pytest.fixture(scope="module")
def distributed_weights(ep2: Finished):
    return _load_distributed(_step_ckpt(ep2, CKPT_EVERY))


def test_distributed_checkpoint_holds_the_one_process_model_names_and_full_expert_shapes(distributed_weights):
    weights, metadata = distributed_weights
    saved = {k.removeprefix("state_dict.") for k in metadata if k.startswith("state_dict.")}
    assert saved == set(weights)
    experts = [k for k in weights if k.endswith(("experts.w_in", "experts.w_out"))]
    assert len(experts) == 4  # w_in and w_out of the 2 MoE layers of conf/debug.yaml
    for key in experts:
        E, D, F = 4, 64, 64  # conf/debug.yaml: num_experts, model.dim, moe.expert_hidden
        want = (E, D, 2 * F) if key.endswith("w_in") else (E, F, D)
        assert tuple(metadata[f"state_dict.{key}"].size) == want, key
        assert tuple(weights[key].shape) == want, key
    assert not any(t.isnan().any() for t in weights.values()), [k for k, t in weights.items() if t.isnan().any()]


def test_distributed_checkpoint_holds_rank_1_experts(distributed_weights):
    weights, _ = distributed_weights
    for key in [k for k in weights if k.endswith(("experts.w_in", "experts.w_out"))]:
        w = weights[key]
        for e in (2, 3):  # rank 1's
            assert w[e].abs().sum() > 0, f"{key}[{e}] is all zero"
            for other in (0, 1):
                assert not torch.equal(w[e], w[other]), f"{key}[{e}] == {key}[{other}]"


def test_distributed_checkpoint_weights_equal_the_one_process_run_at_the_same_step(distributed_weights, one: Finished):
    """Every tensor, every expert of both ranks: the same as one process after the same 4 steps
    (measured: within 2e-7)."""
    weights, _ = distributed_weights
    ref = torch.load(_step_ckpt(one, CKPT_EVERY), map_location="cpu", weights_only=True)["state_dict"]
    assert set(ref) == set(weights)
    diffs = {k: float((weights[k].float() - ref[k].float()).abs().max()) for k in ref}
    assert max(diffs.values()) <= 1e-5, {k: f"{d:.2e}" for k, d in diffs.items() if d > 1e-5}


# ---------------------------------------------------------------------------------------------
# 5. A parallel config that cannot work: exit 2, one error line, no traceback, no file written

BAD_PARALLEL = {  # name -> (overrides, what the error line must say)
    "ep-does-not-divide-experts": (
        ("trainer.devices=2", "parallel.ep=3"), "parallel.ep=3 must divide moe.num_experts=4"),
    "ep-does-not-divide-processes": (  # one process cannot hold an ep group of 2
        ("trainer.devices=1", "parallel.ep=2"), "parallel.ep=2 must divide the number of processes"),
    "expert-choice-with-ep": (  # expert choice ranks tokens over the whole batch: refused, not a traceback or hang
        ("moe.router.kind=expert_choice", "moe.dropless=false", "parallel.ep=2", "trainer.devices=2"),
        "expert_choice routing"),
}


@pytest.mark.parametrize("name", list(BAD_PARALLEL))
def test_bad_parallel_config_exits_2_with_one_error_line(train_job: TrainJob, tmp_path: Path, name: str):
    overrides, message = BAD_PARALLEL[name]
    result = train_job.run(tmp_path, train_job.debug_args(*overrides, "run.name=bad"), timeout=90)
    assert result.returncode == 2, result.explain()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.explain()
    assert message in lines[0], result.explain()
    assert "parallel.ep" in lines[0]  # it names the setting to change
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_four_processes_ep2_by_dp2_train_like_one_process(one: Finished, workdir: Path, train_job: TrainJob):
    """The 2-D composition: experts sharded over ep=2 AND FSDP-sharded over the 2 data-parallel
    ranks that hold the same experts. Capacity is per ep group here (2 of the 4 ranks' tokens), so
    compare the steps before anything is dropped, and the memory a rank holds."""
    four = _train(train_job, workdir, "ep2dp2", "trainer.devices=4", "parallel.ep=2", "trainer.batch_size=4",
                  "trainer.max_steps=3", "moe.dropless=true")
    dropless_one = _train(train_job, workdir, "one-dropless", *ONE, "trainer.max_steps=3", "moe.dropless=true")
    for step in (1, 2, 3):
        assert abs(four.metrics["train/loss"][step] - dropless_one.metrics["train/loss"][step]) < LOSS_TOL
    ratio = four.metrics["mem/param_optim_mb_per_rank"][3] / one.metrics["mem/param_optim_mb_per_rank"][3]
    assert 0.24 <= ratio <= 0.30, ratio  # a quarter per rank, plus whatever does not divide evenly

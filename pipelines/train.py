"""Train a model: tokenize (once), build, fit, track in MLflow; resume an interrupted run exactly.

    python -m pipelines train conf/default.yaml                (or: make train)
    python -m pipelines train conf/debug.yaml moe.num_experts=4 trainer.max_steps=50
    python -m pipelines train --resume runs/<name>/checkpoints/last.ckpt   (or: make train RESUME=...)

A run lives in runs/<run.name>/: checkpoints/, config.yaml and run.json (its MLflow run id).
Running the same command again continues the run from its last checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from app.callbacks import Checkpointing, Interrupt, MoEMetrics, StepMetrics
from app.checkpoint import checkpoint_config, file_to_distributed, latest_checkpoint, read_checkpoint
from app.data import Shards, TokenDataModule, token_byte_lengths, unigram_loss
from app.errors import UserError, say
from app.evaluation import EvalConfig
from app.module import MoELanguageModel
from app.parallel import ParallelConfig, build_strategy, needs_model_parallel
from app.perf import choose_precision, matmul_flops, precision_dtype
from app.plots import expert_load_plot
from app.run_lock import lock_run
from app.tracked_logger import make_logger
from app.tracking import PENDING_FILE, TrackingConfig, check_store, git_commit, missing_database, tracking_uri
from app.trainer import EXIT_INTERRUPTED, TrainingStopped, build_trainer
from moe import ModelKind, model_stats
from pipelines.cli import config_parser, split_config_arg
from pipelines.config import ExperimentConfig, RunConfig, config_from_yaml, load_config, to_flat_dict, to_yaml
from pipelines.tokenize import TokenData, prepare_data


@dataclass
class RunPlan:
    """Where a run lives and what it resumes from."""

    dir: Path
    resume_from: Path | None
    mlflow_run_id: str | None
    saved: ExperimentConfig | None = None  # the config the resumed checkpoint carries

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"


def train(config: ExperimentConfig, *, recipe: str = "", resume: Path | None = None) -> RunPlan:
    """Fit `config`; returns the run's folder and what it resumed from."""
    torch.manual_seed(config.trainer.seed)
    if config.tracking.enabled:
        check_store(tracking_uri(config.tracking))
    plan = plan_run(config, recipe=recipe, resume=resume)  # every refusal before anything is written
    if config.tracking.enabled:
        _check_tracked_run(config, plan)
    data = prepare_data(config.data, progress=config.trainer.progress_bar)
    config.model.vocab_size = data.meta["vocab_size"]  # the tokenizer decides the vocabulary
    if plan.saved is not None and plan.saved.model.vocab_size != config.model.vocab_size:
        raise UserError(f"checkpoint {plan.resume_from} was trained with a {plan.saved.model.vocab_size}-token "
                        f"vocabulary, this data gives {config.model.vocab_size}: resume with the run's data settings")
    precision = _precision(config, plan)
    say(f"run {config.run.name}: {plan.dir}" + (f", resuming from {plan.resume_from}" if plan.resume_from else ""))
    module, datamodule = _build(config, data)
    logger = _logger(config, plan, recipe) if config.tracking.enabled else None
    stats = model_stats(config.model, config.moe)
    moe_metrics, interrupt = MoEMetrics(log_every=config.trainer.log_every), Interrupt()
    callbacks = [
        StepMetrics(log_every=config.trainer.log_every,
                    tokens_per_micro_batch=config.trainer.batch_size * config.trainer.seq_len,
                    flops_per_token=stats.flops_per_token_train, peak_flops=_peak(config, precision)),
        moe_metrics,
        Checkpointing(plan.checkpoints, every=config.trainer.ckpt_every, keep=config.trainer.keep_checkpoints,
                      val_every=config.trainer.val_every, interrupt=interrupt),
        interrupt,  # Ctrl-C: Checkpointing writes the step's checkpoint, then the run stops
    ]
    strategy = "auto"
    if needs_model_parallel(config.parallel, config.trainer.devices, plan.resume_from):
        strategy = build_strategy(config.parallel, config.trainer.devices)
        if plan.resume_from is not None and plan.resume_from.is_file():
            plan.resume_from = _as_distributed(plan, config, data)
    trainer = build_trainer(config.trainer, precision=precision, callbacks=callbacks, logger=logger,
                            strategy=strategy, num_nodes=config.parallel.num_nodes)
    baseline = unigram_loss(data.memmap("train"), data.memmap("val"), data.meta["vocab_size"])
    # A new MLflow run (a fresh run, or a resume with tracking.continue_run=false) gets the params.
    new_mlflow_run = plan.mlflow_run_id is None
    _start_run_files(plan, config, logger, data, stats, new_mlflow_run=new_mlflow_run, trainer=trainer)
    if logger is not None and new_mlflow_run and trainer.is_global_zero:
        logger.log_metrics({"val/unigram_loss": baseline}, step=0)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=plan.resume_from, weights_only=True)
    except TrainingStopped as stop:  # non-finite values, a checkpoint that cannot be written, Ctrl-C
        stop.end_run(logger, latest_checkpoint(plan.checkpoints))
        if logger is not None and (notice := logger.flush_pending()):  # the tracking server went away
            say(notice)
        raise
    if trainer.global_step % config.trainer.val_every:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    if trainer.is_global_zero:
        if logger is not None:
            _log_artifacts(logger, plan, config, data, moe_metrics)
        _summary(plan, module, trainer, logger, baseline)
        if logger is not None and (notice := logger.flush_pending()):  # the tracking server went away
            say(notice)
    return plan


def plan_run(config: ExperimentConfig, *, recipe: str, resume: Path | None) -> RunPlan:
    """Name the run, find what to resume, and refuse a checkpoint of another model shape."""
    if not config.run.name:
        config.run.name = default_run_name(config, recipe)
    run_dir = Path(config.run.root) / config.run.name
    lock_run(Path(config.run.root), config.run.name)  # before reading its checkpoints; held until exit
    resume_from = resume
    found = latest_checkpoint(run_dir / "checkpoints")
    if resume_from is None and found is not None:
        if config.run.resume:
            resume_from = found
        else:
            _archive(run_dir)
    if resume_from is None:
        return RunPlan(run_dir, None, None)
    checkpoint = read_checkpoint(resume_from)
    if "experiment_config" not in checkpoint:
        raise UserError(f"{resume_from} carries no moe-lm config: it is not a checkpoint of this project")
    saved = config_from_yaml(checkpoint["experiment_config"])
    _check_same_model(config, saved, resume_from)
    return RunPlan(run_dir, resume_from, _previous_run_id(run_dir, checkpoint), saved)


def _check_tracked_run(config: ExperimentConfig, plan: RunPlan) -> None:
    """A resumed run continues its MLflow run: it must be in this tracking store."""
    if plan.mlflow_run_id is None:
        return
    if not config.tracking.continue_run:
        plan.mlflow_run_id = None
        return
    uri = tracking_uri(config.tracking)
    found = not missing_database(uri)
    if found:
        try:
            MlflowClient(uri).get_run(plan.mlflow_run_id)
        except MlflowException:
            found = False
    if not found:
        raise UserError(
            f"the checkpoint's MLflow run {plan.mlflow_run_id} is not in {uri}: point tracking.uri at the store "
            "it was logged to, or log the resumed training to a new MLflow run with tracking.continue_run=false"
        )


def default_run_name(config: ExperimentConfig, recipe: str) -> str:
    """<recipe>-<kind>-<6 hex of the config>: the same command finds (and resumes) the same run.

    The hash covers what defines the experiment (model, moe, data, optim, trainer), not where or
    how it runs (devices, parallelism, tracking, progress bar, evaluation settings).
    """
    trainer = dataclasses.replace(config.trainer, devices=1, accelerator="auto", progress_bar=True)
    model = dataclasses.replace(config.model, vocab_size=1)  # decided by the tokenizer (data.* is hashed)
    settings = dataclasses.replace(config, run=RunConfig(), tracking=TrackingConfig(), parallel=ParallelConfig(),
                                   eval=EvalConfig(), trainer=trainer, model=model)
    digest = hashlib.sha256(to_yaml(settings).encode()).hexdigest()[:6]
    stem = Path(recipe).stem if recipe else "custom"
    return f"{stem}-{config.model.kind.value}-{digest}"


def _archive(run_dir: Path) -> None:
    """run.resume=false on a run with checkpoints: keep the old run under a dated name."""
    archived = run_dir.with_name(f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(archived)
    say(f"run.resume=false: the previous run is kept in {archived}; starting afresh")


def _check_same_model(config: ExperimentConfig, saved: ExperimentConfig, checkpoint: Path) -> None:
    for section in ("model", "moe"):
        mine, theirs = to_flat_dict(getattr(config, section)), to_flat_dict(getattr(saved, section))
        shape_keys = [k for k in mine if mine[k] != theirs.get(k) and k not in _NON_SHAPE]
        if shape_keys:
            key = shape_keys[0]
            raise UserError(
                f"checkpoint {checkpoint} has {section}.{key}={theirs.get(key)} but the config says {mine[key]}: "
                "resume with the checkpoint's config, or start a new run (run.name=... or run.resume=false)"
            )


# Keys that change training behaviour but not the shape of the weights: allowed to differ on resume.
_NON_SHAPE = {"vocab_size", "capacity_factor", "eval_capacity_factor", "dropless", "drop_policy", "aux_loss_coef", "z_loss_coef",
              "expert_impl", "recompute_activations", "router.jitter_eps", "router.bias_update_rate", "router.random_second", "init_std"}


def _previous_run_id(run_dir: Path, checkpoint: dict) -> str | None:
    """The MLflow run a resumed run continues: the checkpoint's, else the run folder's run.json."""
    run_id = checkpoint.get("mlflow_run_id")
    info = run_dir / "run.json"
    if not run_id and info.is_file():
        run_id = json.loads(info.read_text()).get("mlflow_run_id")
    return run_id


def _as_distributed(plan: RunPlan, config: ExperimentConfig, data: TokenData) -> Path:
    """A single-process checkpoint file, converted (once) to a folder several processes can load."""
    out = plan.checkpoints / "converted" / plan.resume_from.name
    out.parent.mkdir(parents=True, exist_ok=True)
    module, _ = _build(dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, ep=1)), data)
    say(f"converting {plan.resume_from} to a distributed checkpoint: {out}")
    return file_to_distributed(plan.resume_from, module, out)


def _precision(config: ExperimentConfig, plan: RunPlan) -> str:
    if config.trainer.precision == "auto" and plan.saved is not None:
        config.trainer.precision = plan.saved.trainer.precision  # resume exactly as the run started
    if config.trainer.precision != "auto":
        return config.trainer.precision
    config.trainer.precision = choose_precision(_device(config))  # recorded in the run's config
    say(f"trainer.precision=auto -> {config.trainer.precision} (measured on this machine)")
    return config.trainer.precision


def _peak(config: ExperimentConfig, precision: str) -> float:
    if config.trainer.peak_tflops:
        return config.trainer.peak_tflops * 1e12
    return matmul_flops(precision_dtype(precision), _device(config))


def _device(config: ExperimentConfig) -> torch.device:
    """The device the run trains on (what precision and peak are measured on)."""
    return torch.device("cuda" if torch.cuda.is_available() and config.trainer.accelerator != "cpu" else "cpu")


def _build(config: ExperimentConfig, data: TokenData) -> tuple[MoELanguageModel, TokenDataModule]:
    split = data.meta["splits"]["val"]
    shards = Shards(data.train_path, data.val_path, data.meta["dtype"], split["bytes"], split["tokens"])
    datamodule = TokenDataModule(
        shards, batch_size=config.trainer.batch_size, seq_len=config.trainer.seq_len,
        val_batches=config.trainer.val_batches, seed=config.trainer.seed, accumulate=config.trainer.accumulate,
    )
    module = MoELanguageModel(
        config.model, config.moe, config.optim, max_steps=config.trainer.max_steps,
        token_bytes=token_byte_lengths(data.tokenizer_path), config_yaml=to_yaml(config), parallel=config.parallel,
    )
    return module, datamodule


def _logger(config: ExperimentConfig, plan: RunPlan, recipe: str):
    tags = {"kind": config.model.kind.value, "preset": Path(recipe).stem if recipe else "custom",
            "git_commit": git_commit(), "run_name": config.run.name}
    if config.model.kind == ModelKind.moe:
        tags["routing"] = config.moe.router.kind.value
    return make_logger(config.tracking, run_name=config.run.name, tags=tags, run_id=plan.mlflow_run_id,
                       pending=plan.dir / PENDING_FILE)


def _start_run_files(plan, config, logger, data, stats, *, new_mlflow_run: bool, trainer) -> None:
    """config.yaml and run.json in the run folder; params on a new MLflow run."""
    if not trainer.is_global_zero:
        return
    plan.dir.mkdir(parents=True, exist_ok=True)
    (plan.dir / "config.yaml").write_text(to_yaml(config))
    if logger is None:
        return
    info = {"mlflow_run_id": logger.run_id, "tracking_uri": tracking_uri(config.tracking),
            "experiment": config.tracking.experiment}
    (plan.dir / "run.json").write_text(json.dumps(info, indent=1))
    if not new_mlflow_run:
        logger.reopen()  # FAILED or KILLED by the stop this run resumes from: RUNNING again
    else:
        params = to_flat_dict(config)
        params.update({"data.cache_key": data.meta["cache_key"], "data.val_documents": len(data.meta["splits"]["val"]["names"]),
                       "stats.total_params": stats.total_params, "stats.active_params": stats.active_params,
                       "stats.flops_per_token_train": stats.flops_per_token_train})
        logger.log_hyperparams(params)


def _log_artifacts(logger, plan: RunPlan, config: ExperimentConfig, data: TokenData, moe_metrics: MoEMetrics) -> None:
    # Through the logger: if the tracking server is down they are kept, like metrics, for `make sync`.
    logger.log_artifact(plan.dir / "config.yaml")
    logger.log_artifact(data.tokenizer_path)
    logger.log_dict({"val_documents": data.meta["splits"]["val"]["names"], "cache_key": data.meta["cache_key"]},
                    "data_split.json")
    if moe_metrics.history:
        plot = expert_load_plot(moe_metrics.history, config.model.moe_layer_ids, plan.dir / "expert_load.png")
        logger.log_artifact(plot)
    final = latest_checkpoint(plan.checkpoints)
    if final is None:
        return
    logger.set_tags({"final_checkpoint": str(final.resolve())})
    files = [final] if final.is_file() else [p for p in final.iterdir() if p.is_file()]
    if sum(p.stat().st_size for p in files) / 2**20 > config.tracking.checkpoint_artifact_max_mb:
        return  # large: the tag holds its path
    try:
        logger.log_artifact(final, "checkpoints" if final.is_file() else f"checkpoints/{final.name}")
    except OSError as err:  # e.g. a resumed run logged a different checkpoint under this name
        say(f"warning: the final checkpoint was not copied to MLflow ({err}); its path is the tag final_checkpoint")


def _summary(plan: RunPlan, module: MoELanguageModel, trainer, logger, baseline: float) -> None:
    val = module.last_val_metrics
    lines = [f"done: {trainer.global_step} steps; checkpoints in {plan.checkpoints}"]
    if val:
        lines.append(f"val/loss {val['val/loss']:.3f} (unigram baseline {baseline:.3f}), "
                     f"ppl {val['val/ppl']:.1f}, bits/byte {val['val/bits_per_byte']:.3f}")
    if logger is not None:
        lines.append(f"MLflow run {logger.run_id} in experiment '{logger._experiment_name}': see it with `make ui`")
    say("\n".join(lines))


def main(argv: list[str]) -> int:
    parser = config_parser("python -m pipelines train", __doc__.splitlines()[0])
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint to resume (its config is used)")
    args = parser.parse_intermixed_args(argv)  # `train CONFIG --resume CKPT key=value` (the Makefile's order)
    path, overrides = split_config_arg(args)
    if args.resume is not None:
        # The checkpoint's own config, then any overrides (e.g. trainer.max_steps to train longer).
        config = config_from_yaml(checkpoint_config(args.resume), overrides)
    else:
        config = load_config(path, overrides)
    try:
        train(config, recipe=path or "", resume=args.resume)
    except TrainingStopped as stop:
        return stopped(stop)
    return 0


def stopped(stop: TrainingStopped) -> int:
    """Print why training stopped (one line, on rank 0) and return the exit code."""
    if not stop.rank_zero:
        # Exit 0: Lightning's launcher kills the main process as soon as a child exits non-zero,
        # which could cut rank 0 short while it marks the MLflow run.
        return 0
    say(f"{'' if stop.exit_code == EXIT_INTERRUPTED else 'error: '}{stop}")
    return stop.exit_code

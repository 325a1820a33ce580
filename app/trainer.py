"""The Lightning Trainer for a run: precision, devices, clipping, accumulation, callbacks."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import Strategy

from app.checkpoint import AtomicCheckpointIO

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")

# Exit codes: 2 = refused before anything was written (app.errors.UserError); 1 = training
# started and stopped on a fault found while running (non-finite values, a checkpoint that cannot
# be written); 130 = Ctrl-C (128 + SIGINT, the shell's convention).
EXIT_FAILED, EXIT_INTERRUPTED = 1, 130


def _shown(path: Path) -> str:
    """`path` relative to the working folder when it is inside it (as the user typed it)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def on_any_rank(trainer: L.Trainer, flag: bool) -> bool:
    """Whether `flag` holds on any rank. A collective: every rank calls it at the same point, so all
    of them take the same decision (stop, or not) and none waits in a collective for another."""
    count = torch.tensor(float(flag), device=trainer.strategy.root_device)
    return bool(trainer.strategy.reduce(count, reduce_op="sum") > 0)


class TrainingStopped(Exception):
    """Training stopped early on purpose, with nothing lost: the weights were not updated with bad
    values and the last checkpoint is intact (or, for Ctrl-C, the current step's was written).

    Raised on every rank at once (the ranks agree first, so none waits in a collective for another).
    Lightning marks the MLflow run FAILED on any exception; `end_run` then sets `mlflow_status`.
    Entry points print the message (one line, no traceback) and exit with `exit_code`.
    """

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILED, mlflow_status: str = "FAILED",
                 rank_zero: bool = True, name_last_checkpoint: bool = False):
        super().__init__(message)
        self.message, self.exit_code, self.mlflow_status = message, exit_code, mlflow_status
        self.rank_zero = rank_zero  # only global rank 0 prints and marks the run
        self.name_last_checkpoint = name_last_checkpoint  # the raiser does not know the run's folder

    def __str__(self) -> str:
        return self.message

    def end_run(self, logger: Logger | None, last_checkpoint: Path | None) -> None:
        if self.name_last_checkpoint:
            self.message += (f"; the last checkpoint {_shown(last_checkpoint)} is intact"
                             if last_checkpoint else "; no checkpoint was written yet")
        if self.rank_zero and logger is not None:
            logger.finalize(self.mlflow_status)


@dataclass
class TrainerConfig:
    max_steps: int = 800  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch and process
    seq_len: int = 256
    accumulate: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    precision: str = "auto"  # auto: bf16-mixed where bf16 products are measured faster, else 32-true
    val_every: int = 100  # optimizer steps between validations (and at the end)
    val_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 1337
    accelerator: str = "auto"  # cpu, cuda, auto
    devices: int = 1
    peak_tflops: float = 0.0  # the MFU denominator; 0: measured at start for the precision used
    progress_bar: bool = True

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "seq_len", "accumulate", "val_every", "val_batches", "log_every",
                    "ckpt_every", "keep_checkpoints", "devices")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.grad_clip < 0 or self.peak_tflops < 0:
            raise ValueError("trainer.grad_clip and trainer.peak_tflops must be >= 0")


class ProgressBar(TQDMProgressBar):
    """Lightning's bar with loss, tokens/s and the last validation loss; no version number."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class _NoLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Drop Lightning's advertising tip and a torch-version deprecation it triggers; keep real warnings."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoLitLoggerTip())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # Our epoch-level values are reduced over ranks before they are logged.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")


def build_trainer(
    config: TrainerConfig, *, precision: str, callbacks: list[L.Callback], logger: Logger | None,
    strategy: Strategy | str = "auto", num_nodes: int = 1,
) -> L.Trainer:
    quiet_lightning()
    bar = [ProgressBar(refresh_rate=max(1, config.log_every // 2))] if config.progress_bar else []
    return L.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        max_steps=config.max_steps,
        accumulate_grad_batches=config.accumulate,
        gradient_clip_val=config.grad_clip or None,
        val_check_interval=config.val_every * config.accumulate,  # counted in micro-batches
        check_val_every_n_epoch=None,
        limit_val_batches=config.val_batches,
        num_sanity_val_steps=0,
        logger=logger if logger is not None else False,
        callbacks=[*callbacks, *bar],
        enable_checkpointing=False,  # app.callbacks.Checkpointing writes them, atomically
        enable_progress_bar=config.progress_bar,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()] if strategy == "auto" else [],  # ModelParallel writes folders itself
        deterministic=False,
        use_distributed_sampler=True,
    )

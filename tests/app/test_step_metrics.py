"""app/callbacks/step_metrics.py: train/loss and train/ce as Lightning hands the step outputs to
callbacks, and the throughput arithmetic under a fixed clock."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loops.optimization.automatic import ClosureResult

import app.callbacks.step_metrics as step_metrics
from app.callbacks.step_metrics import StepMetrics


class Logger:
    def __init__(self):
        self.calls: list[tuple[dict, int]] = []

    def log_metrics(self, metrics, step):
        self.calls.append((metrics, step))


def fake_trainer(*, accumulate: int, world_size: int = 1, max_steps: int = 100) -> SimpleNamespace:
    optimizer = SimpleNamespace(param_groups=[{"lr": 0.5}], state={})
    return SimpleNamespace(accumulate_grad_batches=accumulate, world_size=world_size, max_steps=max_steps,
                           global_step=0, logger=Logger(), optimizers=[optimizer],
                           strategy=SimpleNamespace(reduce=lambda t, reduce_op=None: t))


class _Module(torch.nn.Module):
    """A LightningModule stand-in: 10 float32 parameters and a `log` that discards."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(10))

    def log(self, *args, **kwargs) -> None:
        pass


MODULE = _Module()


def lightning_outputs(loss: float, ce: float, accumulate: int) -> dict:
    """What Lightning's automatic optimization passes to `on_train_batch_end` for a training_step
    that returned {"loss", "total", "ce", ...}: the same construction Lightning uses (it divides
    "loss" by the accumulation steps; "total" is the module's undivided copy)."""
    returned = {"loss": torch.tensor(loss, requires_grad=True), "total": torch.tensor(loss), "ce": torch.tensor(ce),
                "records": []}
    return ClosureResult.from_training_step_output(returned, normalize=accumulate).asdict()


def run_step(callback, trainer, step: int, losses: list[tuple[float, float]]) -> None:
    accumulate = trainer.accumulate_grad_batches
    for micro, (loss, ce) in enumerate(losses):
        trainer.global_step = step if micro == accumulate - 1 else step - 1
        callback.on_train_batch_end(trainer, MODULE, lightning_outputs(loss, ce, accumulate), None,
                                    (step - 1) * accumulate + micro)


def test_train_loss_without_accumulation():
    trainer = fake_trainer(accumulate=1)
    callback = StepMetrics(log_every=1, tokens_per_micro_batch=8, flops_per_token=1.0, peak_flops=1.0)
    run_step(callback, trainer, 1, [(3.5, 3.0)])
    (metrics, step), = trainer.logger.calls
    assert step == 1 and metrics["train/loss"] == pytest.approx(3.5) and metrics["train/ce"] == pytest.approx(3.0)
    assert metrics["lr"] == 0.5


def test_train_loss_with_accumulation_is_the_mean_micro_batch_loss():
    trainer = fake_trainer(accumulate=4)
    callback = StepMetrics(log_every=1, tokens_per_micro_batch=8, flops_per_token=1.0, peak_flops=1.0)
    run_step(callback, trainer, 1, [(3.5, 3.0), (3.7, 3.2), (3.3, 2.8), (3.5, 3.0)])
    (metrics, _), = trainer.logger.calls
    assert metrics["train/ce"] == pytest.approx(3.0)
    assert metrics["train/loss"] == pytest.approx(3.5)


def test_throughput_and_mfu_under_a_fixed_clock(monkeypatch):
    clock = iter([100.0, 104.0, 106.0])  # train start, log at step 2, log at step 4
    monkeypatch.setattr(step_metrics.time, "perf_counter", lambda: next(clock))
    trainer = fake_trainer(accumulate=2, world_size=3)
    callback = StepMetrics(log_every=2, tokens_per_micro_batch=64, flops_per_token=1e3, peak_flops=1e9)
    callback.on_train_start(trainer, MODULE)
    for step in range(1, 5):
        run_step(callback, trainer, step, [(1.0, 1.0), (1.0, 1.0)])
    assert [step for _, step in trainer.logger.calls] == [2, 4]
    # 2 steps x 2 micro-batches x 64 tokens x 3 ranks = 768 tokens in 4 s, then in 2 s.
    first, second = (metrics for metrics, _ in trainer.logger.calls)
    assert first["perf/tokens_per_s"] == pytest.approx(192.0)
    assert second["perf/tokens_per_s"] == pytest.approx(384.0)
    assert second["perf/mfu"] == pytest.approx(384.0 * 1e3 / 1e9)


def test_memory_counts_local_parameters_and_optimizer_state():
    module = torch.nn.Linear(4, 3)  # 12 + 3 float32 parameters
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.randn(2, 4)).sum().backward()
    optimizer.step()  # two moments per parameter, and a scalar step each
    expected = (15 * 4 + 2 * 15 * 4 + 2 * 4) / 2**20
    assert step_metrics.param_optim_megabytes(module, optimizer) == pytest.approx(expected)

"""Loss, learning rate, throughput and MFU per optimizer step.

`train/loss` (cross entropy + weighted MoE losses) and `train/ce` are averaged over the step's
micro-batches and all ranks. `perf/tokens_per_s` counts every rank's tokens over the wall time
since the last log; `perf/mfu` = tokens/s x training FLOPs per token / peak FLOP/s of the machine.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from torch import Tensor

from moe.experts import local_shard


class StepMetrics(L.Callback):
    def __init__(self, *, log_every: int, tokens_per_micro_batch: int, flops_per_token: float, peak_flops: float):
        self.log_every = log_every
        self.tokens_per_micro_batch = tokens_per_micro_batch  # one rank's
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._sums: Tensor | None = None  # loss, ce, micro-batches since the last optimizer step
        self._clock: tuple[float, int] | None = None  # (time, step) of the last log

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._clock = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        row = torch.stack([outputs["total"].float(), outputs["ce"].float(), torch.ones((), device=outputs["ce"].device)])
        self._sums = row if self._sums is None else self._sums + row
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        sums, self._sums = self._sums, None
        step = trainer.global_step
        if step % self.log_every and step != trainer.max_steps:
            return
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        metrics = {"train/loss": float(sums[0] / sums[2]), "train/ce": float(sums[1] / sums[2]),
                   "lr": trainer.optimizers[0].param_groups[0]["lr"], **self._throughput(trainer, step)}
        metrics["mem/param_optim_mb_per_rank"] = param_optim_megabytes(pl_module, trainer.optimizers[0])
        pl_module.log("tok/s", metrics.get("perf/tokens_per_s", 0.0), prog_bar=True, logger=False)
        if trainer.logger:
            trainer.logger.log_metrics(metrics, step=step)

    def _throughput(self, trainer: L.Trainer, step: int) -> dict[str, float]:
        now = time.perf_counter()
        then, last_step = self._clock or (now, step)
        self._clock = (now, step)
        if step == last_step or now == then:
            return {}
        tokens = (step - last_step) * trainer.accumulate_grad_batches * self.tokens_per_micro_batch * trainer.world_size
        tokens_per_s = tokens / (now - then)
        return {"perf/tokens_per_s": tokens_per_s, "perf/mfu": tokens_per_s * self.flops_per_token / self.peak_flops}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation time is not training time: restart the throughput clock.
        self._clock = (time.perf_counter(), trainer.global_step)


def param_optim_megabytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Parameters plus optimizer state held by this rank (local shards only), in MiB; the largest
    over all ranks. FSDP and expert parallelism exist to shrink exactly this."""
    local = [local_shard(p) for p in module.parameters()]
    local += [local_shard(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    total = torch.tensor(float(sum(t.numel() * t.element_size() for t in local)))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX)
    return float(total) / 2**20


"""Per-layer MoE metrics and the aux-loss-free bias update.

Routing records are summed over the micro-batches of one optimizer step and over every
data-parallel rank (all-reduce) before anything is computed from them, so the expert loads that
are logged, and that steer the DeepSeek-V3 bias, are the global ones.

Metric names (an interface; see ../shared/DESIGN.md): per MoE layer i (its index in the
transformer) `moe/layer_{i}/load_max_over_mean`, `load_cv`, `router_entropy`, `dropped_frac`,
`aux_loss`, `z_loss`; aggregated `moe/dropped_frac`, `moe/load_max_over_mean` (the worst layer),
`moe/aux_loss`, `moe/z_loss` (summed over layers, as they enter the loss).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from moe import RoutingRecord


class MoEMetrics(L.Callback):
    def __init__(self, log_every: int):
        self.log_every = log_every
        self._sums: Tensor | None = None  # (layers, 2E + 5): per-step accumulator
        self.history: list[tuple[int, list[list[float]]]] = []  # (step, per-layer load share) for plots

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        records: list[RoutingRecord] = outputs["records"]
        if not records:
            return
        sums = torch.stack([_pack(r) for r in records])
        self._sums = sums if self._sums is None else self._sums + sums
        if not _stepped(trainer, batch_idx):
            return
        sums, self._sums = trainer.strategy.reduce(self._sums, reduce_op="sum"), None
        num_experts = records[0].tokens_per_expert.numel()
        routed_LE = sums[:, num_experts : 2 * num_experts]
        pl_module.model.update_expert_biases(list(routed_LE))
        step = trainer.global_step
        if step % self.log_every == 0 or step == trainer.max_steps:
            micro = sums[0, -1]
            metrics = layer_metrics(sums, num_experts, micro, pl_module.model.config.moe_layer_ids)
            trainer.logger and trainer.logger.log_metrics(metrics, step=step)
            share_LE = routed_LE / routed_LE.sum(dim=1, keepdim=True).clamp_min(1)
            self.history.append((step, share_LE.tolist()))

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = [(int(s), v) for s, v in state.get("history", [])]


def _pack(r: RoutingRecord) -> Tensor:
    """One row: kept (E), routed (E), dropped, assignments, entropy, aux, z, micro-batch count."""
    scalars = torch.stack([r.dropped.float(), r.assignments.float(), r.router_entropy.float(),
                           r.aux_loss.detach().float(), r.z_loss.detach().float(), torch.ones((), device=r.aux_loss.device)])
    return torch.cat([r.tokens_per_expert.float(), r.routed_per_expert.float(), scalars])


def _stepped(trainer: L.Trainer, batch_idx: int) -> bool:
    """True on the micro-batch that ends an optimizer step (gradient accumulation)."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


def layer_metrics(sums_LX: Tensor, num_experts: int, micro: Tensor, layer_ids: list[int]) -> dict[str, float]:
    """Metrics from the accumulated rows: loads from the routed counts (the demand balancing acts
    on), dropped fraction from kept vs routed, losses and entropy averaged over micro-batches."""
    routed_LE = sums_LX[:, num_experts : 2 * num_experts]
    mean_L = routed_LE.mean(dim=1).clamp_min(1e-9)
    dropped_L, assignments_L = sums_LX[:, 2 * num_experts], sums_LX[:, 2 * num_experts + 1]
    entropy_L, aux_L, z_L = (sums_LX[:, 2 * num_experts + k] / micro for k in (2, 3, 4))
    per_layer = {
        "load_max_over_mean": routed_LE.max(dim=1).values / mean_L,
        "load_cv": routed_LE.std(dim=1, unbiased=False) / mean_L,
        "router_entropy": entropy_L,
        "dropped_frac": dropped_L / assignments_L.clamp_min(1),
        "aux_loss": aux_L,
        "z_loss": z_L,
    }
    metrics = {f"moe/layer_{i}/{name}": float(values[j]) for name, values in per_layer.items() for j, i in enumerate(layer_ids)}
    metrics["moe/dropped_frac"] = float(dropped_L.sum() / assignments_L.sum().clamp_min(1))
    metrics["moe/load_max_over_mean"] = float(per_layer["load_max_over_mean"].max())
    metrics["moe/aux_loss"] = float(aux_L.sum())
    metrics["moe/z_loss"] = float(z_L.sum())
    return metrics

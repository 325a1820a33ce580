"""The LightningModule: next-token cross entropy plus the MoE losses, AdamW, warmup-cosine.

Shape legend: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor

from app.parallel import ParallelConfig, parallelize
from moe import MoEConfig, RoutingRecord, Transformer, TransformerConfig


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1  # matrices only: never norms, biases or the router's expert bias
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("optim: lr must be > 0, min_lr_ratio in [0, 1], warmup_steps and weight_decay >= 0")


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 1/warmup to 1, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def moe_loss(records: list[RoutingRecord], moe: MoEConfig) -> tuple[Tensor, Tensor, Tensor]:
    """(weighted MoE loss to add, sum of raw aux losses, sum of raw z-losses) over MoE layers.

    Each layer's losses are added on their own (Switch, ST-MoE): summing, not averaging, keeps the
    pressure on every layer the same whatever the depth, and one collapsed layer cannot hide.
    """
    if not records:
        zero = torch.zeros(())
        return zero, zero, zero
    aux = torch.stack([r.aux_loss for r in records]).sum()
    z = torch.stack([r.z_loss for r in records]).sum()
    return moe.aux_loss_coef * aux + moe.z_loss_coef * z, aux, z


def clip_global_norm(params: list[torch.nn.Parameter], max_norm: float) -> Tensor:
    """torch's clip_grad_norm_, for gradients that are DTensors on different meshes (experts on the
    ep mesh, the rest on the data-parallel mesh): one norm per mesh, then combined. Returns it."""
    groups: dict = {}
    for p in params:
        groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    if coef < 1.0:
        for grads in groups.values():
            for grad in grads:
                grad.mul_(coef)
    return total


class MoELanguageModel(L.LightningModule):
    """Builds the model in `configure_model`, so a parallel strategy can shard it first."""

    def __init__(
        self, model: TransformerConfig, moe: MoEConfig, optim: OptimConfig, *,
        max_steps: int, token_bytes: Tensor | None = None, config_yaml: str = "",
        parallel: ParallelConfig | None = None,
    ):
        super().__init__()
        self.model_config, self.moe_config, self.optim = model, moe, optim
        self.parallel = parallel or ParallelConfig()
        self.max_steps = max_steps
        self.config_yaml = config_yaml  # the whole resolved config, carried by every checkpoint
        self.model: Transformer | None = None
        # UTF-8 bytes per token id (0 for specials): bits per byte on validation.
        self.register_buffer("token_bytes", token_bytes, persistent=False)
        self._val_sums: Tensor | None = None
        self.last_val_metrics: dict[str, float] = {}  # of the latest validation, over all ranks

    def configure_model(self) -> None:
        if self.model is not None:
            return
        # NOTE: built with real weights (not on the meta device): Lightning's meta-device
        # materialisation would call every submodule's default reset_parameters and undo our init.
        with torch.device(self.device):
            model = Transformer(self.model_config, self.moe_config)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 + expert parallelism
            parallelize(model, self.device_mesh, self.parallel)
        self.model = model

    def forward(self, tokens_BT: Tensor) -> tuple[Tensor, list[RoutingRecord]]:
        return self.model(tokens_BT)

    def losses(self, tokens_BT1: Tensor) -> dict:
        """Cross entropy of next-token prediction plus the MoE losses, and the routing records."""
        inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
        logits_BTV, records = self.model(inputs_BT)
        ce = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten())
        extra, aux, z = moe_loss(records, self.moe_config)
        loss = ce + extra.to(ce.device)
        # NOTE: Lightning divides outputs["loss"] by the accumulation steps before callbacks see it;
        # "total" keeps the undivided value for logging.
        return {"loss": loss, "total": loss.detach(), "ce": ce.detach(), "aux": aux.detach(), "z": z.detach(),
                "records": records}

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        # Seed from the global micro-batch index: router noise is a function of the data position,
        # so a resumed run draws exactly the noise the uninterrupted run would have.
        torch.manual_seed(int(batch["index"]) * 1_000_003 + self.trainer.global_rank)
        out = self.losses(batch["tokens"])
        self.log("loss", out["ce"], prog_bar=True, logger=False)
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        inputs_BT, targets_BT = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
        logits_BTV, _ = self.model(inputs_BT)
        nll_BT = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), reduction="none")
        bytes_BT = self.token_bytes[targets_BT.flatten()] if self.token_bytes is not None else torch.ones_like(nll_BT)
        sums = torch.stack([nll_BT.sum(), torch.tensor(float(nll_BT.numel()), device=nll_BT.device),
                            (nll_BT * (bytes_BT > 0)).sum(), bytes_BT.sum().float()])
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums

    def on_validation_epoch_start(self) -> None:
        self._val_sums = None

    def on_validation_epoch_end(self) -> None:
        metrics = self.validation_metrics()  # a collective: every rank computes it here
        self.last_val_metrics = metrics
        if not metrics:
            return
        self.log("val", metrics["val/loss"], prog_bar=True, logger=False, sync_dist=False)
        if self.logger is not None and not self.trainer.sanity_checking:
            self.logger.log_metrics(metrics, step=self.trainer.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["experiment_config"] = self.config_yaml
        run_id = getattr(self.logger, "run_id", None)
        if run_id:
            checkpoint["mlflow_run_id"] = run_id

    def validation_metrics(self) -> dict[str, float]:
        """val/loss (nats per token), val/ppl, val/bits_per_byte over all ranks' windows."""
        if self._val_sums is None:
            return {}
        sums = self.trainer.strategy.reduce(self._val_sums.detach(), reduce_op="sum")
        loss = float(sums[0] / sums[1])
        return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)),
                "val/bits_per_byte": float(sums[2] / sums[3].clamp_min(1) / math.log(2))}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by the global gradient norm over every parameter, whatever mesh it lives on."""
        if gradient_clip_val:
            clip_global_norm([p for p in self.parameters() if p.grad is not None], float(gradient_clip_val))

    def configure_optimizers(self):
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim.lr, betas=(self.optim.beta1, self.optim.beta2), eps=self.optim.eps,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, warmup=self.optim.warmup_steps, total=self.max_steps, min_ratio=self.optim.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

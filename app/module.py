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

from app.nonfinite import first_nonfinite_output, nonfinite_names
from app.parallel import ParallelConfig, parallelize
from app.trainer import TrainingStopped
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
        checks = [("lr", self.lr > 0, "> 0"), ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                  ("warmup_steps", self.warmup_steps >= 0, ">= 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
                  ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= self.beta2 < 1, "in [0, 1)")]
        for key, ok, rule in checks:
            if not ok:
                raise ValueError(f"optim.{key} must be {rule}, got {getattr(self, key)}")


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


def global_grad_norm(params: list[torch.nn.Parameter]) -> Tensor:
    """The 2-norm of every gradient together, for gradients that are DTensors on different meshes
    (experts on the ep mesh, the rest on the data-parallel mesh): one norm per mesh, then combined.
    The same value on every rank."""
    groups: dict = {}
    for p in params:
        groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def exact_grad_norm(params: list[torch.nn.Parameter]) -> Tensor:
    """global_grad_norm in float64, one gradient at a time: for when float32 squares overflow
    although every gradient is finite (huge but finite gradients). Slow; a fallback only."""
    squares = torch.zeros((), dtype=torch.float64)
    for p in params:
        norm = torch.linalg.vector_norm(p.grad, dtype=torch.float64)
        squares += (norm.full_tensor() if isinstance(norm, DTensor) else norm).cpu() ** 2
    return squares.sqrt()


def clip_global_norm(params: list[torch.nn.Parameter], max_norm: float, *, norm: float | None = None) -> Tensor:
    """torch's clip_grad_norm_ over every mesh (see global_grad_norm); `norm` if already known.
    Returns the norm before clipping."""
    total = global_grad_norm(params) if norm is None else torch.tensor(norm)
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
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
        self._micro_batches: list[tuple[dict, Tensor]] = []  # (batch, loss) since the last optimizer step
        self._grad_norm: float | None = None  # of the step about to be taken, for clipping
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
        self._seed_router_noise(batch)
        out = self.losses(batch["tokens"])
        self._micro_batches.append((batch, out["total"]))  # checked before the optimizer step
        self.log("loss", out["ce"], prog_bar=True, logger=False)
        return out

    def _seed_router_noise(self, batch: dict) -> None:
        # Seed from the global micro-batch index: router noise is a function of the data position,
        # so a resumed run draws exactly the noise the uninterrupted run would have.
        torch.manual_seed(int(batch["index"]) * 1_000_003 + self.trainer.global_rank)

    def on_before_optimizer_step(self, optimizer) -> None:
        """NOTE: the one gate before the weights change. The step's losses and its global gradient
        norm are checked together (one host sync per step, the one clipping needs anyway); if any
        is non-finite on any rank, every rank raises TrainingStopped before the optimizer step, so
        neither the weights nor a checkpoint ever hold the bad values. (Under 16-mixed, gradients
        that overflow are left to the GradScaler, which skips such steps by design.)"""
        micro, self._micro_batches = self._micro_batches, []
        params = [p for p in self.parameters() if p.grad is not None]
        norm = global_grad_norm(params)
        bad_M = torch.stack([~torch.isfinite(loss) for _, loss in micro]).float() if micro else norm.new_zeros(0)
        bad_M = self.trainer.strategy.reduce(bad_M.to(norm.device), reduce_op="sum")  # on any rank
        *bad, total = torch.cat([bad_M, norm.reshape(1).float()]).tolist()
        scaled = getattr(getattr(self.trainer, "precision_plugin", None), "scaler", None) is not None
        overflow = not any(bad) and not math.isfinite(total) and not scaled
        if overflow and not nonfinite_names(self._named_grads()):
            total = float(exact_grad_norm(params))  # finite gradients whose squares overflow float32
        if any(bad) or not (math.isfinite(total) or scaled):
            raise self._nonfinite(micro, next((i for i, b in enumerate(bad) if b), None), total)
        self._grad_norm = total

    def _named_grads(self) -> list[tuple[str, Tensor | None]]:
        return [(name, p.grad) for name, p in self.model.named_parameters()]

    def _nonfinite(self, micro: list[tuple[dict, Tensor]], first_bad: int | None, norm: float) -> TrainingStopped:
        """Name where the non-finite value appeared: re-run the forward of the first micro-batch whose
        loss is non-finite with a hook on every module; else the first parameter whose gradient is."""
        step = self.trainer.global_step + 1  # the step being taken: its metrics would be logged at `step`
        if first_bad is not None:
            batch, losses = micro[first_bad][0], []

            def forward() -> None:
                self._seed_router_noise(batch)  # the same router noise as the failed forward
                losses.append(self.losses(batch["tokens"]))

            where = first_nonfinite_output(self.model, forward)
            parts = ", ".join(f"{k}={float(losses[0][k]):.4g}" for k in ("ce", "aux", "z"))
            of = f" (micro-batch {first_bad + 1} of {len(micro)})" if len(micro) > 1 else ""
            message = f"non-finite loss at step {step}{of}: " + (f"first non-finite value in {where}" if where else
                                                                  f"every module output is finite, the loss is not ({parts})")
        else:
            named = self._named_grads()
            grads = nonfinite_names(named)
            # Backward runs from the loss to the embedding: the non-finite gradient nearest the
            # loss (the last in module order) is the nearest to where it appeared.
            message = f"non-finite gradient at step {step}: " + (
                f"{len(grads)} of {len(named)} parameters, the nearest the loss being {grads[-1]}" if grads else
                f"the global gradient norm is {norm}")
        return TrainingStopped(message + "; the weights were not updated", rank_zero=self.trainer.is_global_zero,
                               name_last_checkpoint=True)

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
        norm, self._grad_norm = self._grad_norm, None  # measured by on_before_optimizer_step
        if gradient_clip_val:
            clip_global_norm([p for p in self.parameters() if p.grad is not None], float(gradient_clip_val), norm=norm)

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

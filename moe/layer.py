"""The MoE layer: router -> dispatch -> experts -> combine, plus optional shared experts.

`MoELayer.forward` returns the output and a `RoutingRecord` of what routing did; there is no hidden
state to read and reset. Drop it into any model whose FFN maps (B, T, D) -> (B, T, D).

Shape legend: B sequences, T tokens, D model width, E experts, S kept assignments sorted by expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moe.dispatch import DropPolicy, expert_capacity
from moe.experts import ExpertImpl, GroupedExperts, SwiGLU
from moe.losses import load_balancing_loss, router_entropy, router_z_loss
from moe.parallel import ExpertOutput, LocalExperts
from moe.router import Router, RouterConfig, RouterOutput, RoutingKind


@dataclass
class MoEConfig:
    num_experts: int = 8
    expert_hidden: int = 256  # F of each routed expert; fine-grained = many experts with small F
    num_shared_experts: int = 0  # DeepSeekMoE: always-active experts, each of width expert_hidden
    router: RouterConfig = field(default_factory=RouterConfig)
    capacity_factor: float = 1.25  # training; slots per expert = ceil(factor * T * K / E)
    eval_capacity_factor: float = 2.0
    dropless: bool = False  # no capacity: every assignment is computed
    drop_policy: DropPolicy = DropPolicy.probs
    aux_loss_coef: float = 0.01  # Switch/GShard load-balancing loss, per MoE layer
    z_loss_coef: float = 0.001  # ST-MoE router z-loss, per MoE layer
    expert_impl: ExpertImpl = ExpertImpl.loop
    # Keep only each expert's pre-activation for the backward and recompute silu and SwiGLU there:
    # about half the experts' activation memory for two more elementwise passes (Megatron-Core's
    # `moe_act` recomputation). README, Performance, has both measured.
    recompute_activations: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            self.router = RouterConfig(**self.router)
        self.drop_policy = DropPolicy(self.drop_policy)
        self.expert_impl = ExpertImpl(self.expert_impl)
        if self.num_experts < 1 or self.expert_hidden < 1 or self.num_shared_experts < 0:
            raise ValueError("moe.num_experts and moe.expert_hidden must be >= 1, num_shared_experts >= 0")
        if self.router.top_k > self.num_experts:
            raise ValueError(
                f"moe.router.top_k={self.router.top_k} exceeds moe.num_experts={self.num_experts}: "
                "lower top_k or add experts"
            )
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            raise ValueError("moe.capacity_factor and moe.eval_capacity_factor must be > 0")
        if self.dropless and self.router.kind == RoutingKind.expert_choice:
            raise ValueError("expert_choice routing is capacity-based by definition: set moe.dropless=false")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ValueError("moe.aux_loss_coef and moe.z_loss_coef must be >= 0")

    @property
    def active_experts(self) -> float:
        """Routed experts a token uses on average (expert choice: capacity_factor * top_k)."""
        if self.router.kind == RoutingKind.expert_choice:
            return min(self.capacity_factor * self.router.top_k, self.num_experts)
        return self.router.top_k


@dataclass
class RoutingRecord:
    """What one MoE layer's routing did in one forward. Tensors stay on device (no host sync).

    Loads count assignments per expert: `routed_per_expert` is what the router chose (the demand
    that balancing acts on), `tokens_per_expert` what the experts computed after capacity.
    """

    tokens_per_expert: Tensor  # (E,) long, kept
    routed_per_expert: Tensor  # (E,) long, before capacity
    dropped: Tensor  # () long: dropped assignments (expert choice: tokens no expert took)
    assignments: Tensor  # () long: the denominator of the dropped fraction
    router_prob_mean: Tensor  # (E,) float32 mean router probability
    router_entropy: Tensor  # () float32 nats, mean over tokens
    aux_loss: Tensor  # () float32, differentiable
    z_loss: Tensor  # () float32, differentiable

    @property
    def dropped_frac(self) -> Tensor:
        return self.dropped.float() / self.assignments.clamp_min(1).float()


class MoELayer(nn.Module):
    """Sparse SwiGLU FFN with routed (and optional shared) experts. (B, T, D) -> (B, T, D)."""

    def __init__(self, config: MoEConfig, dim: int):
        super().__init__()
        self.config = config
        self.router = Router(config.router, dim, config.num_experts)
        self.experts = GroupedExperts(config.num_experts, dim, config.expert_hidden, config.expert_impl,
                                      config.recompute_activations)
        shared_hidden = config.num_shared_experts * config.expert_hidden
        self.shared = SwiGLU(dim, shared_hidden) if shared_hidden else None
        # Where the experts run: here, or on their ranks (moe.parallel.parallelize_experts).
        self.dispatcher = LocalExperts()
        self.reset_parameters(std=0.02, out_std=0.02)

    def reset_parameters(self, std: float, out_std: float) -> None:
        self.router.reset_parameters(std)
        self.experts.reset_parameters(std, out_std)
        if self.shared is not None:
            self.shared.reset_parameters(std, out_std)

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for this forward (None = dropless); eval mode uses the eval factor."""
        cfg = self.config
        if cfg.dropless:
            return None
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        return expert_capacity(num_tokens, cfg.num_experts, cfg.router.top_k, factor)

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, RoutingRecord]:
        batch, seq_len, dim = x_BTD.shape
        x_TD = x_BTD.reshape(-1, dim)
        policy = self.config.drop_policy
        capacity = self.capacity(self.dispatcher.group_tokens(x_TD.shape[0]))
        route = self.router(x_TD, seq_len=seq_len, capacity=self.dispatcher.plan_capacity(capacity), policy=policy)
        routed = self.dispatcher(
            self.experts, x_TD, route.plan, capacity=capacity, policy=policy, top_k=self.config.router.top_k
        )
        out_TD = routed.out_TD.to(x_BTD.dtype)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        return out_TD.view(batch, seq_len, dim), self._record(route, routed)

    def update_bias(self, load_E: Tensor) -> None:
        """Aux-loss-free balancing step; a no-op unless router.bias_update_rate > 0."""
        if self.config.router.aux_free:
            self.router.update_bias(load_E)

    def _record(self, route: RouterOutput, routed: ExpertOutput) -> RoutingRecord:
        """Under expert parallelism, `tokens_per_expert` and `dropped` cover this rank's experts and
        `routed_per_expert`/`assignments` this rank's tokens: summed over ranks they are global. The
        load-balancing loss uses the ep group's routed counts, as one process would."""
        plan = route.plan
        group_routed_E = self.dispatcher.global_counts(plan.routed_E)
        return RoutingRecord(
            tokens_per_expert=routed.kept_E.detach(),
            routed_per_expert=plan.routed_E.detach(),
            dropped=routed.dropped.detach(),
            assignments=plan.assignments.detach(),
            router_prob_mean=route.probs_TE.detach().mean(dim=0),
            router_entropy=router_entropy(probs_TE=route.probs_TE.detach()),
            aux_loss=load_balancing_loss(probs_TE=route.probs_TE, tokens_per_expert_E=group_routed_E),
            z_loss=router_z_loss(logits_TE=route.logits_TE),
        )

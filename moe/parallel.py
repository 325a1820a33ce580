"""Expert parallelism: the experts of every MoE layer are split over the ranks of an `ep` group.

Each rank routes its own tokens (the router is replicated), sends every (token, expert) assignment
to the rank that owns the expert with one uneven all-to-all (counts exchanged first), runs its local
experts, and sends the outputs back the same way; autograd flows through both all-to-alls.

Capacity is applied where the experts are, over every assignment the ep group sent them, in the
order one process would have used on the concatenated batch (rank 0's tokens first). So with or
without expert parallelism, the same global batch keeps and drops the same assignments.

Shape legend: T local tokens, D model width, E experts, El local experts, W ep ranks, S this
rank's assignments sorted by expert, R assignments received from all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from moe.dispatch import DispatchPlan, DropPolicy, combine, sort_and_keep
from moe.experts import GroupedExperts
from moe.router import RoutingKind


@dataclass
class ExpertOutput:
    out_TD: Tensor  # per token, the routed experts' outputs summed with the plan's weights
    kept_E: Tensor  # long (E,): assignments computed per expert (this rank's experts only under EP)
    dropped: Tensor  # long scalar: assignments dropped here


class LocalExperts:
    """One process holds every expert: capacity is applied when the plan is made."""

    def group_tokens(self, num_tokens: int) -> int:
        return num_tokens

    def plan_capacity(self, capacity: int | None) -> int | None:
        return capacity

    def global_counts(self, routed_E: Tensor) -> Tensor:
        return routed_E

    def __call__(self, experts: GroupedExperts, x_TD: Tensor, plan: DispatchPlan, **_) -> ExpertOutput:
        # NOTE: gather, experts and combine run expert by expert in one autograd function: the
        # [T*K, D] rows an all-to-all must send are never built here.
        out_TD = experts.combine_tokens(x_TD, plan.token_S, plan.weight_S, plan.counts_E)
        return ExpertOutput(out_TD, plan.counts_E, plan.dropped)


class AllToAllExperts:
    """Experts e in [rank * El, (rank + 1) * El) live on ep rank `rank`."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int):
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_local = num_experts // self.world

    def group_tokens(self, num_tokens: int) -> int:
        """Tokens that meet at an expert: every ep rank's (equal batches)."""
        return num_tokens * self.world

    def plan_capacity(self, capacity: int | None) -> None:
        return None  # the sender keeps every assignment; the expert's rank applies capacity

    def global_counts(self, routed_E: Tensor) -> Tensor:
        """Routed counts over the whole ep group (for the load-balancing loss)."""
        total_E = routed_E.clone()
        dist.all_reduce(total_E, group=self.group)
        return total_E

    def __call__(
        self, experts: GroupedExperts, x_TD: Tensor, plan: DispatchPlan, *,
        capacity: int | None, policy: DropPolicy, top_k: int,
    ) -> ExpertOutput:
        send_WE = plan.counts_E.view(self.world, self.num_local)
        recv_WE = self._exchange(send_WE.reshape(-1)).view(self.world, self.num_local)
        send, recv = send_WE.sum(1).tolist(), recv_WE.sum(1).tolist()
        x_RD = all_to_all_single_autograd(x_TD.index_select(0, plan.token_S), recv, send, self.group)
        position_R = self._exchange(plan.position_S + self.rank * x_TD.shape[0] * top_k, recv, send)
        priority_R = self._exchange(plan.priority_S.float(), recv, send)
        expert_R = torch.arange(self.num_local, device=x_TD.device).repeat(self.world)
        expert_R = expert_R.repeat_interleave(recv_WE.reshape(-1))
        kept_K, counts_El = self._keep(expert_R, priority_R, position_R, capacity, policy)
        y_KD = experts(x_RD.index_select(0, kept_K), counts_El, grad_scale=1.0 / self.world)
        y_RD = y_KD.new_zeros(x_RD.shape[0], y_KD.shape[-1]).index_copy(0, kept_K, y_KD)
        y_SD = all_to_all_single_autograd(y_RD, send, recv, self.group)
        kept_E = torch.zeros(self.world * self.num_local, dtype=torch.long, device=x_TD.device)
        kept_E[self.rank * self.num_local : (self.rank + 1) * self.num_local] = counts_El
        dropped = torch.tensor(x_RD.shape[0], device=x_TD.device) - kept_K.numel()
        return ExpertOutput(combine(y_SD, plan, x_TD.shape[0]), kept_E, dropped)

    def _keep(self, expert_R, priority_R, position_R, capacity, policy) -> tuple[Tensor, Tensor]:
        """Indices of the received assignments to compute, grouped by local expert, and their counts."""
        batch_order = torch.argsort(position_R)  # as one process would see the concatenated batch
        expert_B = expert_R[batch_order]
        routed_El1 = torch.bincount(expert_B, minlength=self.num_local + 1)
        kept = sort_and_keep(expert_B, priority_R[batch_order], routed_El1, capacity, policy, has_skips=False)
        counts_El = routed_El1[: self.num_local]
        if capacity is not None:
            counts_El = counts_El.clamp(max=capacity)
        return batch_order[kept], counts_El

    def _exchange(self, t: Tensor, recv: list[int] | None = None, send: list[int] | None = None) -> Tensor:
        """all_to_all of metadata (no gradient); equal splits when no sizes are given."""
        out = t.new_empty(sum(recv) if recv is not None else t.numel())
        dist.all_to_all_single(out, t.contiguous(), recv, send, group=self.group)
        return out


def parallelize_experts(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts over `ep_mesh` (a 1-D mesh) and route through all-to-all.

    NOTE: expert weights become DTensors sharded on dim 0 (experts): a distributed checkpoint then
    holds every rank's experts under one name, and reloads them at any other ep size. Every rank
    must hold the same initial weights (same seed); rank 0's are kept.
    """
    ep = ep_mesh.size()
    for layer in model.moe_layers():
        cfg = layer.config
        if cfg.router.kind == RoutingKind.expert_choice:
            raise ValueError("expert_choice routing does not support parallel.ep > 1 (it ranks tokens globally)")
        if cfg.num_experts % ep:
            raise ValueError(f"parallel.ep={ep} must divide moe.num_experts={cfg.num_experts}")
        for name in ("w_in", "w_out"):
            full = getattr(layer.experts, name).detach()
            setattr(layer.experts, name, nn.Parameter(distribute_tensor(full, ep_mesh, [Shard(0)])))
        layer.dispatcher = AllToAllExperts(ep_mesh.get_group(), cfg.num_experts)

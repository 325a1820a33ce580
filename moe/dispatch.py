"""From routing decisions to a dispatch plan: sort assignments by expert, apply capacity, combine.

An *assignment* is one (token, expert, weight) triple; token-choice routing makes K per token.
The plan lists the kept assignments sorted by expert so each expert reads one contiguous slice.

Shape legend: T tokens, D model width, E experts, K experts per token, A = T*K assignments,
S kept (sorted) assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor


class DropPolicy(str, Enum):
    """Which assignments an over-full expert keeps."""

    probs = "probs"  # the highest router weights (Megatron-Core's "probs")
    position = "position"  # the earliest tokens in the batch (GShard/Switch's first-come order)


@dataclass
class DispatchPlan:
    """Kept assignments sorted by expert, and what capacity did to the rest.

    `dropped / assignments` is the dropped fraction. For token choice, `assignments` counts the
    (token, expert) pairs the router chose; for expert choice it counts tokens and `dropped`
    those that no expert picked.
    """

    token_S: Tensor  # long: which token each kept assignment reads and writes back to
    weight_S: Tensor  # float32 combine weight of each kept assignment
    counts_E: Tensor  # long: kept assignments per expert, sums to S
    routed_E: Tensor  # long: assignments the router chose per expert, before capacity
    dropped: Tensor  # long scalar
    assignments: Tensor  # long scalar
    priority_S: Tensor | None = None  # the `probs` policy's ranking key (token choice)
    position_S: Tensor | None = None  # index t*K + k of each assignment in batch order (token choice)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """Slots per expert: ceil(factor * T * K / E), at least 1 (Switch Transformer, eq. 3).

    Rounded to 9 decimals first so that 1.1 * 100 / 10 gives 11 slots, not 12 (binary floats).
    """
    return max(1, math.ceil(round(factor * num_tokens * top_k / num_experts, 9)))


def plan_token_choice(
    ids_TK: Tensor,
    weights_TK: Tensor,
    *,
    num_experts: int,
    capacity: int | None,
    policy: DropPolicy,
    valid_TK: Tensor | None = None,
    priority_TK: Tensor | None = None,
) -> DispatchPlan:
    """Sort the T*K assignments by expert and keep at most `capacity` per expert.

    `capacity=None` is dropless. Policy `probs` keeps the highest `priority_TK` (the raw router
    scores; default: the weights, which renormalised top-1 makes all equal to 1). Assignments with
    `valid_TK` False (GShard's random routing skipped them) go to a sentinel bucket E that sorts
    last and is never kept nor counted as dropped.
    """
    num_tokens, top_k = ids_TK.shape
    expert_A = ids_TK.reshape(-1)
    if valid_TK is not None:
        expert_A = torch.where(valid_TK.reshape(-1), expert_A, num_experts)
    weight_A = weights_TK.reshape(-1)
    routed_E1 = torch.bincount(expert_A, minlength=num_experts + 1)
    priority_A = weight_A if priority_TK is None else priority_TK.reshape(-1)
    kept_S = sort_and_keep(expert_A, priority_A, routed_E1, capacity, policy, has_skips=valid_TK is not None)
    routed_E = routed_E1[:num_experts]
    counts_E = routed_E if capacity is None else routed_E.clamp(max=capacity)
    return DispatchPlan(
        token_S=torch.div(kept_S, top_k, rounding_mode="floor"),  # assignment t*K + k is token t's
        weight_S=weight_A[kept_S],
        counts_E=counts_E,
        routed_E=routed_E,
        dropped=routed_E.sum() - counts_E.sum(),
        assignments=routed_E.sum(),
        priority_S=priority_A[kept_S],
        position_S=kept_S,
    )


def sort_and_keep(
    expert_A: Tensor, priority_A: Tensor, routed_E1: Tensor, capacity: int | None, policy: DropPolicy, *, has_skips: bool
) -> Tensor:
    """Indices of the kept assignments, grouped by expert (each expert's kept ones first-chosen first).

    `expert_A` must be in batch order (assignment a of token t comes before those of token t+1);
    `routed_E1` counts them per expert with one extra sentinel bucket for skipped assignments.
    """
    # Dropless keeps every assignment, so the order inside an expert is free: one stable sort.
    order_A = _sort_by_expert(expert_A, priority_A, policy if capacity is not None else DropPolicy.position)
    keep_A = _keep_mask(expert_A[order_A], routed_E1, capacity, has_skips=has_skips)
    return order_A if keep_A is None else order_A[keep_A]


def _sort_by_expert(expert_A: Tensor, priority_A: Tensor, policy: DropPolicy) -> Tensor:
    """Permutation grouping assignments by expert; inside an expert, the ones to keep first."""
    if policy == DropPolicy.position:
        # Assignments are token-major, so a stable sort keeps batch order inside each expert.
        return torch.argsort(expert_A, stable=True)
    by_priority_A = torch.argsort(priority_A, descending=True, stable=True)
    return by_priority_A[torch.argsort(expert_A[by_priority_A], stable=True)]


def _keep_mask(
    sorted_expert_A: Tensor, routed_E1: Tensor, capacity: int | None, *, has_skips: bool
) -> Tensor | None:
    """Which sorted assignments survive; None when all do (dropless, nothing skipped)."""
    num_experts = routed_E1.numel() - 1
    if capacity is None:
        return sorted_expert_A < num_experts if has_skips else None
    starts_E1 = torch.cumsum(routed_E1, 0) - routed_E1
    rank_A = torch.arange(sorted_expert_A.numel(), device=sorted_expert_A.device)
    rank_A = rank_A - starts_E1[sorted_expert_A]
    return (sorted_expert_A < num_experts) & (rank_A < capacity)


def plan_expert_choice(scores_TE: Tensor, *, capacity: int) -> DispatchPlan:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its `capacity` best tokens.

    Every expert processes exactly min(capacity, T) tokens; a token may be taken by several experts
    or by none (then only the residual carries it, and it counts as dropped).
    """
    num_tokens, num_experts = scores_TE.shape
    take = min(capacity, num_tokens)
    weight_EC, token_EC = torch.topk(scores_TE.t(), take, dim=1)
    counts_E = torch.full((num_experts,), take, dtype=torch.long, device=scores_TE.device)
    picked_T = torch.zeros(num_tokens, dtype=torch.bool, device=scores_TE.device)
    picked_T[token_EC.reshape(-1)] = True
    return DispatchPlan(
        token_S=token_EC.reshape(-1),
        weight_S=weight_EC.reshape(-1),
        counts_E=counts_E,
        routed_E=counts_E,
        dropped=num_tokens - picked_T.sum(),
        assignments=torch.tensor(num_tokens, device=scores_TE.device),
    )


def combine(y_SD: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """Weighted scatter-add of expert outputs back to their tokens; dropped tokens get zero."""
    out_TD = y_SD.new_zeros(num_tokens, y_SD.shape[-1])
    weighted_SD = y_SD * plan.weight_S.to(y_SD.dtype).unsqueeze(-1)
    return out_TD.index_add(0, plan.token_S, weighted_SD)

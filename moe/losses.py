"""MoE auxiliary losses as pure functions.

Shape legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def load_balancing_loss(*, probs_TE: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
    """Switch/GShard load-balancing loss.

        L = E * sum_e f_e * P_e

    with f_e the fraction of the routed assignments (T*K for top-K, before any capacity drop) that
    chose expert e and P_e the mean router probability of expert e over the T rows. Switch
    Transformer (Fedus et al. 2021, eq. 4) for K=1; GShard (Lepikhin et al. 2020) and Megatron-Core
    normalise the counts by T*K for any K. Uniform routing gives exactly 1; collapse onto one expert
    gives E. Gradient flows through `probs_TE` only (f_e comes from a discrete top-k).

    Args:
        probs_TE: float32 router probabilities; each row sums to 1.
        tokens_per_expert_E: routed assignments per expert (integer counts).
    """
    num_experts = probs_TE.shape[-1]
    f_E = tokens_per_expert_E.to(probs_TE.dtype) / tokens_per_expert_E.sum().clamp_min(1)
    p_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(f_E * p_E)


def router_z_loss(*, logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2.

    It keeps router logits small, which keeps the float32 softmax well conditioned.
    """
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def router_entropy(*, probs_TE: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of each token's router distribution: log(E) is uniform."""
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(dim=-1).mean()

"""The router: scores every token against every expert and decides where tokens go.

Families (RouterConfig.kind):
- token_choice: each token picks its top-k experts (k=1 Switch, k=2 GShard/Mixtral, any k).
- expert_choice: each expert picks its top-capacity tokens (Zhou et al. 2022).
- sequence: one decision per sequence from its mean representation; every token of the sequence
  goes to the same experts with the same weights.

Router math runs in float32 whatever the autocast dtype (Switch Transformer's selective precision).

Shape legend: T tokens, D model width, E experts, K experts per token, B sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.dispatch import DispatchPlan, DropPolicy, plan_expert_choice, plan_token_choice


class RoutingKind(str, Enum):
    token_choice = "token_choice"
    expert_choice = "expert_choice"
    sequence = "sequence"


class ScoreFunc(str, Enum):
    softmax = "softmax"
    sigmoid = "sigmoid"  # DeepSeek-V3: independent per-expert affinities


@dataclass
class RouterConfig:
    kind: RoutingKind = RoutingKind.token_choice
    top_k: int = 2
    score_func: ScoreFunc = ScoreFunc.softmax
    renormalize: bool = True  # rescale the chosen K weights to sum to 1
    noisy_gating: bool = False  # Shazeer et al. 2017: learned Gaussian noise on logits (training)
    jitter_eps: float = 0.0  # Switch: multiply router input by U(1-eps, 1+eps) (training)
    random_second: bool = False  # GShard: keep the 2nd expert with probability 2*w2 (training)
    bias_update_rate: float = 0.0  # DeepSeek-V3 aux-loss-free balancing; 0 turns it off

    def __post_init__(self) -> None:
        self.kind = RoutingKind(self.kind)
        self.score_func = ScoreFunc(self.score_func)
        if self.top_k < 1:
            raise ValueError(f"router.top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.jitter_eps < 1.0:
            raise ValueError(f"router.jitter_eps must be in [0, 1), got {self.jitter_eps}")
        if self.random_second and self.top_k != 2:
            raise ValueError("router.random_second (GShard) needs router.top_k=2")
        if self.bias_update_rate < 0:
            raise ValueError(f"router.bias_update_rate must be >= 0, got {self.bias_update_rate}")
        if self.kind == RoutingKind.expert_choice and self.bias_update_rate > 0:
            raise ValueError("expert_choice routing is balanced by construction: set bias_update_rate=0")
        if self.kind == RoutingKind.expert_choice and self.random_second:
            raise ValueError("router.random_second applies to token choice only: turn it off for expert_choice")

    @property
    def aux_free(self) -> bool:
        return self.bias_update_rate > 0


@dataclass
class TopK:
    ids_TK: Tensor  # chosen experts
    weights_TK: Tensor  # combine weights (renormalised when configured)
    scores_TK: Tensor  # raw scores of the chosen experts: the `probs` drop policy ranks by these
    valid_TK: Tensor | None  # False where GShard's random routing skipped the 2nd expert


@dataclass
class RouterOutput:
    """What the router computed, in float32. Rows are tokens, or sequences for `sequence` routing."""

    logits_TE: Tensor
    probs_TE: Tensor  # a distribution per row (sigmoid scores are normalised for it)
    plan: DispatchPlan


class Router(nn.Module):
    """Linear gate D -> E plus the selection rule of its family.

    NOTE: the expert bias (aux-loss-free balancing) changes which experts are picked, never the
    combine weights: weights always come from the unbiased scores.
    """

    def __init__(self, config: RouterConfig, dim: int, num_experts: int):
        super().__init__()
        if config.top_k > num_experts:
            raise ValueError(f"router.top_k={config.top_k} exceeds num_experts={num_experts}")
        self.config = config
        self.num_experts = num_experts
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.noise = nn.Linear(dim, num_experts, bias=False) if config.noisy_gating else None
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)
        self._select = _SELECTORS[config.kind]

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.gate.weight, std=std)
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)  # Shazeer 2017 starts the noise scale at softplus(0)
        self.expert_bias.zero_()

    def forward(self, x_TD: Tensor, *, seq_len: int, capacity: int | None, policy: DropPolicy) -> RouterOutput:
        with torch.autocast(x_TD.device.type, enabled=False):
            return self._select(self, x_TD.float(), seq_len=seq_len, capacity=capacity, policy=policy)

    def logits(self, x_TD: Tensor) -> Tensor:
        """float32 router logits, with jitter and noise while training."""
        if self.training and self.config.jitter_eps > 0:
            eps = self.config.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        logits_TE = F.linear(x_TD, self.gate.weight.float())
        if self.training and self.noise is not None:
            noise_std_TE = F.softplus(F.linear(x_TD, self.noise.weight.float()))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        return logits_TE

    def scores(self, logits_TE: Tensor) -> tuple[Tensor, Tensor]:
        """(scores used for selection and weights, a normalised distribution for losses/metrics)."""
        if self.config.score_func == ScoreFunc.softmax:
            probs_TE = torch.softmax(logits_TE, dim=-1)
            return probs_TE, probs_TE
        scores_TE = torch.sigmoid(logits_TE)
        return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True)

    def top_k(self, scores_TE: Tensor) -> TopK:
        """Top-K ids (selected on biased scores), their unbiased weights, and GShard's keep mask."""
        _, ids_TK = torch.topk(scores_TE + self.expert_bias, self.config.top_k, dim=-1)
        scores_TK = scores_TE.gather(-1, ids_TK)
        weights_TK = scores_TK
        if self.config.renormalize:
            weights_TK = scores_TK / scores_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        valid_TK = None
        if self.config.random_second and self.training:
            share_T = scores_TK[:, 1] / scores_TK.sum(dim=-1).clamp_min(1e-20)
            keep_second_T = torch.rand_like(share_T) < 2.0 * share_T
            valid_TK = torch.stack([torch.ones_like(keep_second_T), keep_second_T], dim=-1)
        return TopK(ids_TK, weights_TK, scores_TK, valid_TK)

    @torch.no_grad()
    def update_bias(self, load_E: Tensor) -> None:
        """DeepSeek-V3 aux-loss-free update: b_e += rate * sign(mean load - load_e).

        `load_E` is the number of tokens that chose each expert since the last update, summed over
        every data-parallel rank (the caller all-reduces it).
        """
        load_E = load_E.to(self.expert_bias.device, torch.float32)
        self.expert_bias.add_(self.config.bias_update_rate * torch.sign(load_E.mean() - load_E))


def _token_choice(router: Router, x_TD: Tensor, *, seq_len: int, capacity: int | None, policy: DropPolicy) -> RouterOutput:
    logits_TE = router.logits(x_TD)
    scores_TE, probs_TE = router.scores(logits_TE)
    top = router.top_k(scores_TE)
    plan = plan_token_choice(
        top.ids_TK, top.weights_TK, num_experts=router.num_experts, capacity=capacity, policy=policy,
        valid_TK=top.valid_TK, priority_TK=top.scores_TK,
    )
    return RouterOutput(logits_TE, probs_TE, plan)


def _sequence(router: Router, x_TD: Tensor, *, seq_len: int, capacity: int | None, policy: DropPolicy) -> RouterOutput:
    """One decision per sequence, from the sequence's mean representation.

    NOTE: in a causal LM this lets later tokens influence how earlier ones are routed (through
    the mean); it suits task-level routing (Kudugunta et al. 2021) more than next-token training.
    """
    x_BD = x_TD.view(-1, seq_len, x_TD.shape[-1]).mean(dim=1)
    logits_BE = router.logits(x_BD)
    scores_BE, probs_BE = router.scores(logits_BE)
    top = router.top_k(scores_BE)
    plan = plan_token_choice(
        _per_token(top.ids_TK, seq_len), _per_token(top.weights_TK, seq_len), num_experts=router.num_experts,
        capacity=capacity, policy=policy, valid_TK=_per_token(top.valid_TK, seq_len),
        priority_TK=_per_token(top.scores_TK, seq_len),
    )
    return RouterOutput(logits_BE, probs_BE, plan)


def _per_token(t_BK: Tensor | None, seq_len: int) -> Tensor | None:
    return None if t_BK is None else t_BK.repeat_interleave(seq_len, dim=0)


def _expert_choice(router: Router, x_TD: Tensor, *, seq_len: int, capacity: int | None, policy: DropPolicy) -> RouterOutput:
    if capacity is None:
        raise ValueError("expert_choice routing needs a capacity (it cannot be dropless)")
    logits_TE = router.logits(x_TD)
    scores_TE, probs_TE = router.scores(logits_TE)
    return RouterOutput(logits_TE, probs_TE, plan_expert_choice(scores_TE, capacity=capacity))


_SELECTORS = {
    RoutingKind.token_choice: _token_choice,
    RoutingKind.sequence: _sequence,
    RoutingKind.expert_choice: _expert_choice,
}

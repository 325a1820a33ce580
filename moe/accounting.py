"""Parameter and compute accounting: total vs active parameters and FLOPs per token, exactly.

Counts come from the real module tree built on the meta device (no memory, seconds even at 300B),
so they cannot drift from the model code.

Conventions (stated, because papers differ):
- Active parameters: everything a token touches: all non-expert weights (both embedding matrices
  when untied), the router, shared experts and `active_experts` routed experts. Mixtral's 12.9B.
- Forward FLOPs per token: 2 per multiply-add of every active matrix weight (embedding lookup and
  norms excluded, LM head included) plus attention scores and values, 4 * layers * seq_len * H*Hd
  (the PaLM convention: the full context, no causal discount).
- Training FLOPs per token: 3x forward (backward costs twice the forward).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moe.layer import MoEConfig
from moe.transformer import ModelKind, Transformer, TransformerConfig


@dataclass(frozen=True)
class ModelStats:
    total_params: int
    active_params: int
    expert_params: int  # routed experts, all of them
    embedding_params: int  # input embedding (shared with the LM head when tied)
    flops_per_token_fwd: int
    flops_per_token_train: int

    def table(self) -> str:
        rows = [
            ("total parameters", _human(self.total_params)),
            ("active parameters", _human(self.active_params)),
            ("routed-expert parameters", _human(self.expert_params)),
            ("embedding parameters", _human(self.embedding_params)),
            ("forward FLOPs / token", _human(self.flops_per_token_fwd)),
            ("training FLOPs / token", _human(self.flops_per_token_train)),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def model_stats(config: TransformerConfig, moe: MoEConfig | None = None) -> ModelStats:
    """Exact counts for `config` (built on the meta device; nothing is allocated)."""
    with torch.device("meta"):
        model = Transformer(config, moe)
    active_fraction = 0.0
    if config.kind == ModelKind.moe:
        active_fraction = moe.active_experts / moe.num_experts
    total = active = experts = matmul_active = 0.0
    for name, param in model.named_parameters():  # tied weights are yielded once
        n = param.numel()
        is_expert = ".experts." in name
        share = active_fraction if is_expert else 1.0
        total += n
        active += n * share
        experts += n if is_expert else 0
        if param.dim() >= 2 and (name != "embed.weight" or config.tie_embeddings):
            matmul_active += n * share
    attention = 4 * config.n_layers * config.max_seq_len * config.n_heads * config.head_dim
    fwd = 2 * matmul_active + attention
    return ModelStats(
        total_params=int(total),
        active_params=round(active),
        expert_params=int(experts),
        embedding_params=config.vocab_size * config.dim,
        flops_per_token_fwd=round(fwd),
        flops_per_token_train=round(3 * fwd),
    )


def dense_baseline(config: TransformerConfig, moe: MoEConfig | None = None) -> TransformerConfig:
    """The dense model with the same active parameters (hence FLOPs) per token as `config`.

    Every FFN becomes dense with one hidden width h solving
        non-FFN params + n_layers * 3 * dim * h = active params of the MoE model,
    so routers, shared and routed active experts are all paid for by the dense FFN.
    """
    if config.kind == ModelKind.dense:
        return config
    target = model_stats(config, moe).active_params
    probe = dataclasses.replace(config, kind=ModelKind.dense, ffn_hidden=1)
    base = model_stats(probe).active_params - config.n_layers * 3 * config.dim
    hidden = round((target - base) / (3 * config.dim * config.n_layers))
    return dataclasses.replace(probe, ffn_hidden=max(hidden, 1))


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}  ({int(n):,})"
    return f"{int(n):,}"

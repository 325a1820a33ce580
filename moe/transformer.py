"""Decoder-only transformer whose FFNs are dense SwiGLU or MoE layers, by a layer pattern.

RMSNorm pre-normalisation, rotary positions, causal grouped-query attention through
`scaled_dot_product_attention`.

Shape legend: B batch, T sequence length, D model width, H query heads, G key/value heads,
Hd head width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.experts import SwiGLU
from moe.layer import MoEConfig, MoELayer, RoutingRecord


class ModelKind(str, Enum):
    moe = "moe"
    dense = "dense"  # every FFN dense (the `moe` section is ignored)


@dataclass
class TransformerConfig:
    kind: ModelKind = ModelKind.moe
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4  # < n_heads is grouped-query attention; 1 is multi-query
    ffn_hidden: int = 1024  # width of the dense FFN layers
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    moe_every: int = 1  # 1: every FFN is MoE; 2: every other (Switch, GShard)
    moe_first_dense: int = 0  # the first N layers stay dense (DeepSeek)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.kind = ModelKind(self.kind)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len", "moe_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.moe_first_dense < 0:
            raise ValueError(f"model.moe_first_dense must be >= 0, got {self.moe_first_dense}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head width dim/n_heads={self.dim // self.n_heads} must be even for rotary positions")
        if self.kind == ModelKind.moe and not self.moe_layer_ids:
            raise ValueError("this MoE model has no MoE layer: lower model.moe_first_dense or model.moe_every")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def moe_layer_ids(self) -> list[int]:
        """Layers whose FFN is MoE: from `moe_first_dense` on, every `moe_every`-th (ending each group)."""
        if self.kind == ModelKind.dense:
            return []
        first, every = self.moe_first_dense, self.moe_every
        return [i for i in range(first, self.n_layers) if (i - first + 1) % every == 0]


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def rotary_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """cos and sin tables (T, Hd/2) for rotary positions (Su et al. 2021)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_TF = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles_TF.cos(), angles_TF.sin()


def apply_rotary(x_BHTd: Tensor, cos_TF: Tensor, sin_TF: Tensor) -> Tensor:
    """Rotate each pair (i, i + Hd/2) of the head width by its position's angle (GPT-NeoX layout)."""
    x1, x2 = x_BHTd.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos_TF - x2 * sin_TF, x1 * sin_TF + x2 * cos_TF], dim=-1)
    return rotated.to(x_BHTd.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention: H query heads share G key/value heads."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)

    def forward(self, x_BTD: Tensor, cos_TF: Tensor, sin_TF: Tensor) -> Tensor:
        batch, seq_len, _ = x_BTD.shape
        q_BHTd = self.wq(x_BTD).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k_BGTd = self.wk(x_BTD).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BGTd = self.wv(x_BTD).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHTd, k_BGTd = apply_rotary(q_BHTd, cos_TF, sin_TF), apply_rotary(k_BGTd, cos_TF, sin_TF)
        out_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BGTd, v_BGTd, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out_BHTd.transpose(1, 2).reshape(batch, seq_len, -1))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)); ffn dense or MoE."""

    def __init__(self, config: TransformerConfig, moe: MoEConfig | None):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = MoELayer(moe, config.dim) if moe is not None else SwiGLU(config.dim, config.ffn_hidden)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(self, x_BTD: Tensor, cos_TF: Tensor, sin_TF: Tensor) -> tuple[Tensor, RoutingRecord | None]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TF, sin_TF)
        if not self.is_moe:
            return x_BTD + self.ffn(self.ffn_norm(x_BTD)), None
        # A token that capacity drops gets zero from the experts: the residual carries it.
        ffn_BTD, record = self.ffn(self.ffn_norm(x_BTD))
        return x_BTD + ffn_BTD, record


class Transformer(nn.Module):
    """tokens (B, T) -> logits (B, T, V) and one RoutingRecord per MoE layer (in layer order).

    `moe` configures the MoE layers that `config.moe_layer_ids` names; a dense model needs none.
    """

    def __init__(self, config: TransformerConfig, moe: MoEConfig | None = None):
        super().__init__()
        if config.kind == ModelKind.moe and moe is None:
            raise ValueError("a model of kind 'moe' needs a MoEConfig")
        self.config, self.moe_config = config, moe
        moe_ids = set(config.moe_layer_ids)
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, moe if i in moe_ids else None) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(config.max_seq_len, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2 L)
        (GPT-2) so the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.layers:
            block.attn_norm.weight.fill_(1.0)
            block.ffn_norm.weight.fill_(1.0)
            block.attn.reset_parameters(std, out_std)
            block.ffn.reset_parameters(std, out_std)
        self.norm.weight.fill_(1.0)
        cos, sin = rotary_tables(self.config.max_seq_len, self.config.head_dim, self.config.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, tokens_BT: Tensor) -> tuple[Tensor, list[RoutingRecord]]:
        seq_len = tokens_BT.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len={self.config.max_seq_len}")
        cos_TF, sin_TF = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        x_BTD = self.embed(tokens_BT)
        records = []
        for block in self.layers:
            x_BTD, record = block(x_BTD, cos_TF, sin_TF)
            if record is not None:
                records.append(record)
        return self.lm_head(self.norm(x_BTD)), records

    def moe_layers(self) -> list[MoELayer]:
        return [block.ffn for block in self.layers if block.is_moe]

    def update_expert_biases(self, loads: list[Tensor]) -> None:
        """Aux-loss-free balancing: one load vector (E,) per MoE layer, summed over all ranks."""
        layers = self.moe_layers()
        if len(loads) != len(layers):  # check first: a partial update would skew some layers
            raise ValueError(f"got {len(loads)} load vectors for {len(layers)} MoE layers")
        for layer, load_E in zip(layers, loads):
            layer.update_bias(load_E)

"""Sparse Mixture-of-Experts language models in plain PyTorch (no Lightning, no files, no logging).

    from moe import MoEConfig, MoELayer
    layer = MoELayer(MoEConfig(num_experts=8, expert_hidden=512), dim=256)
    y_BTD, record = layer(x_BTD)      # record: loads, dropped tokens, aux and z losses
"""

from moe.accounting import ModelStats, dense_baseline, model_stats
from moe.dispatch import DispatchPlan, DropPolicy
from moe.experts import ExpertImpl, GroupedExperts, SwiGLU
from moe.layer import MoEConfig, MoELayer, RoutingRecord
from moe.losses import load_balancing_loss, router_entropy, router_z_loss
from moe.router import Router, RouterConfig, RoutingKind, ScoreFunc
from moe.transformer import ModelKind, Transformer, TransformerConfig

__all__ = [
    "DispatchPlan", "DropPolicy", "ExpertImpl", "GroupedExperts", "MoEConfig", "MoELayer",
    "ModelKind", "ModelStats", "Router", "RouterConfig", "RoutingKind", "RoutingRecord", "ScoreFunc",
    "SwiGLU", "Transformer", "TransformerConfig", "dense_baseline", "load_balancing_loss",
    "model_stats", "router_entropy", "router_z_loss",
]

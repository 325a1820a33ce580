"""Total vs active parameters and FLOPs per token of any config, built on the meta device.

    python -m pipelines info conf/mixtral_8x7b.yaml        (or: make info CONFIG=conf/mixtral_8x7b.yaml)
    python -m pipelines info conf/default.yaml moe.num_experts=64
"""

from __future__ import annotations

from moe import ModelKind, ModelStats, dense_baseline, model_stats
from pipelines.cli import config_parser, split_config_arg
from pipelines.config import ExperimentConfig, load_config


def info(config: ExperimentConfig) -> str:
    """The report `make info` prints: a headline, the counts and the FLOP-matched dense baseline."""
    model, moe = config.model, config.moe
    stats = model_stats(model, moe)
    lines = [f"{_total_active(stats)} parameters ({_describe(config)})", stats.table()]
    if model.kind == ModelKind.moe:
        dense = dense_baseline(model, moe)
        dense_stats = model_stats(dense)
        lines += [
            "",
            f"dense baseline with the same active parameters: model.kind=dense model.ffn_hidden={dense.ffn_hidden}",
            f"  {_total_active(dense_stats)} parameters, "
            f"{dense_stats.flops_per_token_train / 1e9:.3g} GFLOPs/token to train "
            f"(MoE: {stats.flops_per_token_train / 1e9:.3g})",
        ]
    return "\n".join(lines)


def _total_active(stats: ModelStats) -> str:
    if stats.total_params >= 1e9:
        return f"{stats.total_params / 1e9:.1f}B total / {stats.active_params / 1e9:.1f}B active"
    return f"{stats.total_params / 1e6:.2f}M total / {stats.active_params / 1e6:.2f}M active"


def _describe(config: ExperimentConfig) -> str:
    model, moe = config.model, config.moe
    shape = f"{model.n_layers} layers, dim {model.dim}, {model.n_heads} heads ({model.n_kv_heads} kv), vocab {model.vocab_size}"
    if model.kind == ModelKind.dense:
        return f"dense, {shape}, ffn {model.ffn_hidden}"
    router = moe.router
    shared = f" + {moe.num_shared_experts} shared" if moe.num_shared_experts else ""
    return (
        f"MoE {router.kind.value}, {moe.num_experts} experts{shared} of {moe.expert_hidden}, top-{router.top_k}, "
        f"MoE layers {_layers(model.moe_layer_ids, model.n_layers)}, {shape}"
    )


def _layers(ids: list[int], n_layers: int) -> str:
    return f"all {n_layers}" if len(ids) == n_layers else str(ids)


def main(argv: list[str]) -> int:
    args = config_parser("python -m pipelines info", __doc__.splitlines()[0]).parse_args(argv)
    path, overrides = split_config_arg(args)
    print(info(load_config(path, overrides)))
    return 0

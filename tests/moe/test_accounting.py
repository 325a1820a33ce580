"""Parameter and FLOP accounting against hand arithmetic and published model sizes."""

from __future__ import annotations

import time

import pytest
import torch

from moe import MoEConfig, RouterConfig, Transformer, TransformerConfig, dense_baseline, model_stats


def mixtral() -> tuple[TransformerConfig, MoEConfig]:
    config = TransformerConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                               ffn_hidden=14336, max_seq_len=4096, tie_embeddings=False)
    return config, MoEConfig(num_experts=8, expert_hidden=14336, router=RouterConfig(top_k=2))


def grok1() -> tuple[TransformerConfig, MoEConfig]:
    config = TransformerConfig(vocab_size=131072, dim=6144, n_layers=64, n_heads=48, n_kv_heads=8,
                               ffn_hidden=32768, max_seq_len=8192, tie_embeddings=True)
    return config, MoEConfig(num_experts=8, expert_hidden=32768, router=RouterConfig(top_k=2))


def test_mixtral_8x7b_exact_counts():
    stats = model_stats(*mixtral())
    d, f, v, layers, hd = 4096, 14336, 32000, 32, 128
    attention = d * 32 * hd + 2 * d * 8 * hd + 32 * hd * d  # wq, wk + wv (8 kv heads), wo = 41,943,040
    norms = 2 * d
    router = d * 8
    one_expert = 3 * d * f  # w_in [D, 2F] + w_out [F, D] = 176,160,768
    embeddings = 2 * v * d  # untied: input embedding + LM head
    total = layers * (attention + norms + router + 8 * one_expert) + embeddings + d
    active = layers * (attention + norms + router + 2 * one_expert) + embeddings + d
    assert attention == 41_943_040 and one_expert == 176_160_768
    assert stats.total_params == total == 46_702_792_704
    assert stats.active_params == active == 12_879_925_248
    assert stats.expert_params == layers * 8 * one_expert
    assert stats.embedding_params == v * d
    assert round(stats.total_params / 1e9, 1) == 46.7
    assert round(stats.active_params / 1e9, 1) == 12.9
    # FLOPs: 2 per active matmul weight (no input embedding, no norms) + 4 * L * T * H * Hd.
    matmul = layers * (attention + router + 2 * one_expert) + v * d
    fwd = 2 * matmul + 4 * layers * 4096 * 32 * hd
    assert stats.flops_per_token_fwd == fwd
    assert stats.flops_per_token_train == 3 * fwd


def test_grok1_counts_near_published():
    stats = model_stats(*grok1())
    d, f, layers = 6144, 32768, 64
    attention = 2 * d * 48 * 128 + 2 * d * 8 * 128
    per_layer_shared = attention + 2 * d + d * 8
    tied_embedding = 131072 * d
    assert stats.total_params == layers * (per_layer_shared + 8 * 3 * d * f) + tied_embedding + d
    assert stats.active_params == layers * (per_layer_shared + 2 * 3 * d * f) + tied_embedding + d
    assert stats.total_params == pytest.approx(314e9, rel=0.01)
    assert stats.active_params == pytest.approx(86e9, rel=0.03)
    # Tied: the one embedding matrix counts once in parameters and once (as LM head) in FLOPs.
    matmul = layers * (attention + d * 8 + 2 * 3 * d * f) + tied_embedding
    assert stats.flops_per_token_fwd == 2 * matmul + 4 * layers * 8192 * 48 * 128


def test_big_shapes_are_counted_fast_on_meta():
    for shape in (mixtral, grok1):
        start = time.perf_counter()
        model_stats(*shape())
        assert time.perf_counter() - start < 30


def tiny() -> tuple[TransformerConfig, MoEConfig]:
    config = TransformerConfig(vocab_size=64, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=32,
                               max_seq_len=8, moe_every=2)
    return config, MoEConfig(num_experts=4, expert_hidden=8, router=RouterConfig(top_k=2))


def test_tiny_config_by_hand():
    stats = model_stats(*tiny())
    # Layer 0 dense, layer 1 MoE (moe_every=2). D=16, H=4, G=2, Hd=4, V=64.
    attention = 16 * 16 + 16 * 8 + 16 * 8 + 16 * 16  # 768
    dense_ffn = 16 * 64 + 32 * 16  # 1536
    router = 16 * 4  # 64
    experts = 4 * (16 * 16 + 8 * 16)  # 1536, of which top-2 of 4 = 768 active
    norms = 2 * 2 * 16 + 16
    embeddings = 2 * 64 * 16
    assert stats.total_params == 2 * attention + dense_ffn + router + experts + norms + embeddings == 6800
    assert stats.active_params == 6800 - experts // 2 == 6032
    matmul = 2 * attention + dense_ffn + router + experts // 2 + 64 * 16  # LM head, no input embedding
    assert matmul == 4928
    assert stats.flops_per_token_fwd == 2 * matmul + 4 * 2 * 8 * 4 * 4 == 10880


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("shared", [0, 1])
def test_total_equals_real_model_parameter_count(tie, shared):
    config, moe = tiny()
    config = TransformerConfig(**{**config.__dict__, "tie_embeddings": tie})
    moe = MoEConfig(**{**moe.__dict__, "num_shared_experts": shared})
    real = Transformer(config, moe)
    stats = model_stats(config, moe)
    assert stats.total_params == sum(p.numel() for p in real.parameters())
    expert_numel = sum(p.numel() for n, p in real.named_parameters() if ".experts." in n)
    assert stats.expert_params == expert_numel
    assert stats.active_params == stats.total_params - expert_numel // 2


def test_dense_model_active_equals_total():
    config = TransformerConfig(kind="dense", vocab_size=64, dim=16, n_layers=2, n_heads=4, ffn_hidden=32, max_seq_len=8)
    stats = model_stats(config)
    assert stats.total_params == stats.active_params == sum(p.numel() for p in Transformer(config).parameters())
    assert stats.expert_params == 0


def test_expert_choice_active_experts_is_capacity_factor_times_k():
    config, _ = tiny()
    moe = MoEConfig(num_experts=4, expert_hidden=8, capacity_factor=1.5,
                    router=RouterConfig(kind="expert_choice", top_k=1))
    stats = model_stats(config, moe)
    assert stats.active_params == 6800 - 1536 + round(1536 * 1.5 / 4)


@pytest.mark.parametrize("shape", [mixtral, grok1, tiny])
def test_dense_baseline_matches_active_params(shape):
    config, moe = shape()
    dense = dense_baseline(config, moe)
    assert dense.kind.value == "dense" and dense.moe_layer_ids == []
    assert dense.n_layers == config.n_layers and dense.dim == config.dim
    target = model_stats(config, moe).active_params
    assert model_stats(dense).active_params == pytest.approx(target, rel=0.01)
    assert dense_baseline(dense) is dense


def test_dense_baseline_mixtral_width():
    config, moe = mixtral()
    # Non-FFN params are shared; FFN active per layer = router + 2 experts = 3*D*h  ->  h = 2F + E/3.
    assert dense_baseline(config, moe).ffn_hidden == round(2 * 14336 + 8 / 3)

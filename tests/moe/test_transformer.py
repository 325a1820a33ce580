"""Transformer: causality, GQA against a hand-written attention, layer pattern, ties, autocast,
config validation."""

from __future__ import annotations

import math

import pytest
import torch

from moe import DropPolicy, MoEConfig, MoELayer, RouterConfig, Transformer, TransformerConfig
from moe.experts import SwiGLU
from moe.transformer import Attention


def tiny_config(**overrides) -> TransformerConfig:
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=16)
    return TransformerConfig(**{**base, **overrides})


def tiny_moe(**overrides) -> MoEConfig:
    base = dict(num_experts=4, expert_hidden=16, router=RouterConfig(top_k=2), dropless=True)
    return MoEConfig(**{**base, **overrides})


def build(config: TransformerConfig, moe: MoEConfig | None = None, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config, moe)
    # Larger init than 0.02 so every position's logits depend visibly on its context.
    model.config.init_std = 0.2
    model.reset_parameters()
    return model


# ---------------------------------------------------------------------------------------------
# Causality
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["moe", "dense"])
@pytest.mark.parametrize("cut", [1, 5, 11])
def test_causality(kind, cut):
    model = build(tiny_config(kind=kind), tiny_moe() if kind == "moe" else None)
    torch.manual_seed(1)
    tokens = torch.randint(0, 64, (2, 12))
    changed = tokens.clone()
    changed[:, cut:] = (tokens[:, cut:] + 1 + torch.randint(0, 62, (2, 12 - cut))) % 64
    logits, _ = model(tokens)
    logits2, _ = model(changed)
    torch.testing.assert_close(logits2[:, :cut], logits[:, :cut], rtol=0, atol=1e-6)
    assert (logits2[:, cut] - logits[:, cut]).abs().max() > 1e-3  # the changed position does change


def test_capacity_dropping_is_not_causal():
    """Documents a known property of capacity-based token choice: a later token competing for the
    same expert can push an earlier one out (probs policy), so training with capacity lets future
    tokens change earlier logits. Use dropless (or evaluate dropless) when that matters."""
    config = tiny_config(n_layers=1)
    moe = tiny_moe(num_experts=2, router=RouterConfig(top_k=1, renormalize=False), dropless=False,
                   capacity_factor=0.25, drop_policy=DropPolicy.probs)
    model = build(config, moe)
    torch.manual_seed(2)
    tokens = torch.randint(0, 64, (1, 16))
    base, _ = model(tokens)
    moved = 0
    for _ in range(10):
        changed = tokens.clone()
        changed[0, 8:] = torch.randint(0, 64, (8,))
        logits, _ = model(changed)
        moved += bool((logits[0, :8] - base[0, :8]).abs().max() > 1e-4)
    assert moved > 0


# ---------------------------------------------------------------------------------------------
# Grouped-query attention
# ---------------------------------------------------------------------------------------------


def rope_ref(x_BHTd: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (i, i + Hd/2) by angle p * theta^(-2i/Hd), one position at a time."""
    out = torch.empty_like(x_BHTd)
    half = x_BHTd.shape[-1] // 2
    for p in range(x_BHTd.shape[2]):
        for i in range(half):
            angle = p * theta ** (-2.0 * i / x_BHTd.shape[-1])
            a, b = x_BHTd[..., p, i], x_BHTd[..., p, i + half]
            out[..., p, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., p, i + half] = a * math.sin(angle) + b * math.cos(angle)
    return out


def attention_ref(attn: Attention, x_BTD: torch.Tensor, theta: float) -> torch.Tensor:
    batch, seq_len, _ = x_BTD.shape
    heads, groups, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (x_BTD @ attn.wq.weight.t()).view(batch, seq_len, heads, hd).transpose(1, 2)
    k = (x_BTD @ attn.wk.weight.t()).view(batch, seq_len, groups, hd).transpose(1, 2)
    v = (x_BTD @ attn.wv.weight.t()).view(batch, seq_len, groups, hd).transpose(1, 2)
    q, k = rope_ref(q, theta), rope_ref(k, theta)
    out = torch.zeros(batch, heads, seq_len, hd, dtype=x_BTD.dtype)
    for h in range(heads):
        g = h // (heads // groups)  # query heads h*G/H.. share kv head g (consecutive groups)
        scores = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(hd)
        mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(mask, float("-inf"))
        out[:, h] = torch.softmax(scores, dim=-1) @ v[:, g]
    return out.transpose(1, 2).reshape(batch, seq_len, heads * hd) @ attn.wo.weight.t()


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1), (8, 2)])
def test_gqa_shapes_and_reference(n_heads, n_kv_heads):
    config = tiny_config(kind="dense", n_heads=n_heads, n_kv_heads=n_kv_heads)
    model = build(config).double()
    attn = model.layers[0].attn
    head_dim = 32 // n_heads
    assert attn.wq.weight.shape == (n_heads * head_dim, 32)
    assert attn.wk.weight.shape == (n_kv_heads * head_dim, 32)
    assert attn.wv.weight.shape == (n_kv_heads * head_dim, 32)
    assert attn.wo.weight.shape == (32, n_heads * head_dim)
    torch.manual_seed(3)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    y = attn(x, model.rope_cos[:7], model.rope_sin[:7])
    torch.testing.assert_close(y, attention_ref(attn, x, config.rope_theta), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Layer pattern, ties, records
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "every,first,expected",
    [(1, 0, [0, 1, 2, 3, 4, 5]), (2, 0, [1, 3, 5]), (1, 2, [2, 3, 4, 5]), (2, 2, [3, 5]), (3, 0, [2, 5])],
)
def test_moe_layer_pattern(every, first, expected):
    config = tiny_config(n_layers=6, moe_every=every, moe_first_dense=first)
    assert config.moe_layer_ids == expected
    model = build(config, tiny_moe())
    assert [i for i, block in enumerate(model.layers) if isinstance(block.ffn, MoELayer)] == expected
    assert all(isinstance(block.ffn, SwiGLU) for i, block in enumerate(model.layers) if i not in expected)
    _, records = model(torch.randint(0, 64, (2, 8)))
    assert len(records) == len(expected) == len(model.moe_layers())
    for record in records:
        assert record.routed_per_expert.sum().item() == 2 * 8 * 2  # B*T tokens x top-2


def test_dense_model_has_no_moe_layers_or_records():
    config = tiny_config(kind="dense", n_layers=3)
    assert config.moe_layer_ids == []
    model = build(config, tiny_moe())  # the moe section is ignored
    assert model.moe_layers() == []
    logits, records = model(torch.randint(0, 64, (1, 5)))
    assert records == [] and logits.shape == (1, 5, 64)


def test_tied_embeddings_share_storage():
    tied = build(tiny_config(tie_embeddings=True), tiny_moe())
    assert tied.lm_head.weight is tied.embed.weight
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    untied = build(tiny_config(tie_embeddings=False), tiny_moe())
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 64 * 32
    # A gradient step on the head moves the embedding too.
    logits, _ = tied(torch.randint(0, 64, (1, 4)))
    logits.sum().backward()
    assert tied.embed.weight.grad is not None and tied.embed.weight.grad.abs().sum() > 0


def test_sequence_longer_than_max_seq_len_raises():
    model = build(tiny_config(max_seq_len=8), tiny_moe())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------------


def test_bf16_autocast_runs_and_router_stays_float32():
    model = build(tiny_config(), tiny_moe(expert_impl="grouped_mm"))
    tokens = torch.randint(0, 64, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, records = model(tokens)
        router = model.moe_layers()[0].router
        x = torch.randn(16, 32)
        out = router(x, seq_len=8, capacity=None, policy=DropPolicy.probs)
        plain_matmul = x @ router.gate.weight.t()
    assert plain_matmul.dtype == torch.bfloat16  # autocast is really on
    assert out.logits_TE.dtype == torch.float32
    assert out.probs_TE.dtype == torch.float32
    assert out.plan.weight_S.dtype == torch.float32
    torch.testing.assert_close(out.logits_TE, x @ router.gate.weight.t(), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(logits).all()
    for record in records:
        assert record.aux_loss.dtype == torch.float32 and record.z_loss.dtype == torch.float32
    logits.float().sum().backward()
    assert model.moe_layers()[0].router.gate.weight.grad.dtype == torch.float32
    # bf16 autocast stays close to the fp32 model.
    ref, _ = model(tokens)
    assert (logits.float() - ref).abs().max() < 0.1 * ref.abs().max()


# ---------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: tiny_config(dim=30, n_heads=4), "not divisible by model.n_heads"),
        (lambda: tiny_config(n_heads=4, n_kv_heads=3), "not divisible by model.n_kv_heads"),
        (lambda: tiny_config(dim=12, n_heads=4), "must be even"),
        (lambda: tiny_config(n_layers=0), "n_layers must be >= 1"),
        (lambda: tiny_config(n_layers=2, moe_first_dense=2), "no MoE layer"),
        (lambda: tiny_moe(num_experts=4, router=RouterConfig(top_k=5)), "top_k=5 exceeds moe.num_experts=4"),
        (lambda: tiny_moe(capacity_factor=0.0), "capacity_factor"),
        (lambda: tiny_moe(eval_capacity_factor=-1.0), "capacity_factor"),
        (lambda: tiny_moe(dropless=True, router=RouterConfig(kind="expert_choice")), "expert_choice"),
        (lambda: RouterConfig(top_k=1, random_second=True), "random_second"),
        (lambda: RouterConfig(top_k=3, random_second=True), "random_second"),
        (lambda: RouterConfig(top_k=0), "top_k must be >= 1"),
        (lambda: RouterConfig(jitter_eps=1.0), "jitter_eps"),
        (lambda: RouterConfig(bias_update_rate=-0.1), "bias_update_rate"),
        (lambda: RouterConfig(kind="expert_choice", bias_update_rate=0.1), "balanced by construction"),
        (lambda: RouterConfig(kind="bogus"), "bogus"),
        (lambda: Transformer(tiny_config(kind="moe"), None), "needs a MoEConfig"),
    ],
)
def test_invalid_configs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_valid_edge_configs_build():
    assert tiny_config(n_kv_heads=1).n_kv_heads == 1  # multi-query
    assert tiny_moe(num_experts=4, router=RouterConfig(top_k=4)).router.top_k == 4
    assert MoEConfig(router={"top_k": 2, "random_second": True}).router.random_second


def test_negative_moe_first_dense_is_rejected():
    with pytest.raises(ValueError, match="moe_first_dense"):
        tiny_config(n_layers=4, moe_first_dense=-1)

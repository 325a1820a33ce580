"""MoELayer against a naive per-token loop; capacity and token dropping against hand-made cases."""

from __future__ import annotations

import itertools

import pytest
import torch

from moe import DropPolicy, MoELayer
from moe.dispatch import expert_capacity, plan_token_choice
from tests.moe.reference import ceil_capacity, choose_ref, expert_ref, grads, make_layer, naive_moe, plan_triples

# ---------------------------------------------------------------------------------------------
# 1. Dropless token choice == naive per-token loop, forward and backward.
# ---------------------------------------------------------------------------------------------

CASES = list(itertools.product([1, 2, 4], ["softmax", "sigmoid"], [True, False], [0, 1]))


@pytest.mark.parametrize("top_k,score_func,renormalize,shared", CASES)
def test_dropless_layer_matches_naive_loop(top_k, score_func, renormalize, shared):
    layer = make_layer(top_k=top_k, score_func=score_func, renormalize=renormalize, shared=shared).double()
    torch.manual_seed(1)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    upstream = torch.randn_like(x)

    y, gx, gp = grads(layer, x, lambda x: layer(x)[0], upstream)
    y_ref, gx_ref, gp_ref = grads(layer, x, lambda x: naive_moe(layer, x), upstream)

    assert y.dtype == torch.float64
    # The router runs in float32 even in a float64 module, so everything that flows through the
    # combine weights carries float32 rounding: tolerances of ~1e-5.
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert set(gp) == set(gp_ref)
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], rtol=1e-5, atol=1e-5, msg=name)
    # The router gate gets a gradient through the combine weights, except top-1 renormalised,
    # whose weight is identically 1 (only float32 rounding is left).
    gate_grad_max = gp["router.gate.weight"].abs().max().item()
    if top_k == 1 and renormalize:
        assert gate_grad_max < 1e-4
    else:
        assert gate_grad_max > 1e-3
    assert gp["experts.w_in"].abs().sum() > 0


def test_record_loads_match_naive_choice():
    layer = make_layer(top_k=2, num_experts=4)
    torch.manual_seed(2)
    x = torch.randn(2, 8, 16)
    _, record = layer(x)
    counts = torch.zeros(4, dtype=torch.long)
    for x_D in x.reshape(-1, 16):
        for e, _ in choose_ref(layer, x_D):
            counts[e] += 1
    assert torch.equal(record.routed_per_expert, counts)
    assert torch.equal(record.tokens_per_expert, counts)  # dropless
    assert record.dropped.item() == 0
    assert record.assignments.item() == 16 * 2
    assert record.dropped_frac.item() == 0.0


@pytest.mark.parametrize("shared", [0, 1])
def test_grouped_mm_equals_loop_float32(shared):
    loop = make_layer(top_k=2, shared=shared, expert_impl="loop")
    grouped = make_layer(top_k=2, shared=shared, expert_impl="grouped_mm")
    grouped.load_state_dict(loop.state_dict())
    torch.manual_seed(3)
    x = torch.randn(2, 8, 16)
    upstream = torch.randn_like(x)
    y_a, gx_a, gp_a = grads(loop, x, lambda x: loop(x)[0], upstream)
    y_b, gx_b, gp_b = grads(grouped, x, lambda x: grouped(x)[0], upstream)
    torch.testing.assert_close(y_b, y_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_b, gx_a, rtol=1e-5, atol=1e-6)
    for name in gp_a:
        torch.testing.assert_close(gp_b[name], gp_a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert gp_b["experts.w_in"].abs().sum() > 0


def test_grouped_mm_equals_loop_bfloat16():
    loop = make_layer(top_k=2, expert_impl="loop").to(torch.bfloat16)
    grouped = make_layer(top_k=2, expert_impl="grouped_mm").to(torch.bfloat16)
    grouped.load_state_dict(loop.state_dict())
    torch.manual_seed(4)
    x = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    upstream = torch.randn_like(x)
    y_a, gx_a, gp_a = grads(loop, x, lambda x: loop(x)[0], upstream)
    y_b, gx_b, gp_b = grads(grouped, x, lambda x: grouped(x)[0], upstream)
    assert y_b.dtype == torch.bfloat16
    torch.testing.assert_close(y_b, y_a, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx_b, gx_a, rtol=2e-2, atol=2e-2)
    for name in ("experts.w_in", "experts.w_out"):
        torch.testing.assert_close(gp_b[name], gp_a[name], rtol=2e-2, atol=5e-2, msg=name)


def test_grouped_mm_under_bf16_autocast_matches_loop():
    loop = make_layer(top_k=2, expert_impl="loop")
    grouped = make_layer(top_k=2, expert_impl="grouped_mm")
    grouped.load_state_dict(loop.state_dict())
    torch.manual_seed(5)
    x = torch.randn(2, 8, 16)
    upstream = torch.randn_like(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_a, gx_a, gp_a = grads(loop, x, lambda x: loop(x)[0], upstream)
        y_b, gx_b, gp_b = grads(grouped, x, lambda x: grouped(x)[0], upstream)
    torch.testing.assert_close(y_b, y_a, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx_b, gx_a, rtol=2e-2, atol=2e-2)
    # fp32 master weights get fp32 gradients.
    assert gp_b["experts.w_in"].dtype == torch.float32
    torch.testing.assert_close(gp_b["experts.w_in"], gp_a["experts.w_in"], rtol=2e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------
# 2. Capacity: a hand-set router so every decision is known.
# ---------------------------------------------------------------------------------------------


def fixed_router_layer(*, num_experts: int, top_k: int, dim: int = 8, renormalize: bool = False, **kw) -> MoELayer:
    """Router gate = identity on the first E coordinates: a token's logits are its first E values."""
    layer = make_layer(dim=dim, num_experts=num_experts, top_k=top_k, renormalize=renormalize, dropless=False, **kw)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, :num_experts] = torch.eye(num_experts)
    return layer


def capacity_input() -> torch.Tensor:
    """6 tokens, 2 experts. Tokens 0-3 pick expert 0 with softmax weights sigmoid(0.5, 2, 1, 3);
    tokens 4, 5 pick expert 1."""
    torch.manual_seed(6)
    x = torch.randn(1, 6, 8)
    logits = torch.tensor([[0.5, 0.0], [2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 0.5]])
    x[0, :, :2] = logits
    return x


@pytest.mark.parametrize(
    "policy,dropped_tokens", [("probs", {0, 2}), ("position", {2, 3})]
)
def test_capacity_drops_expected_assignments(policy, dropped_tokens):
    # capacity = ceil(0.5 * 6 * 1 / 2) = 2; expert 0 is asked for 4 slots.
    layer = fixed_router_layer(num_experts=2, top_k=1, capacity_factor=0.5, drop_policy=policy)
    assert layer.capacity(6) == 2
    x = capacity_input()
    y, record = layer(x)

    assert record.routed_per_expert.tolist() == [4, 2]
    assert record.tokens_per_expert.tolist() == [2, 2]
    assert record.dropped.item() == 2
    assert record.assignments.item() == 6
    assert record.dropped_frac.item() == pytest.approx(2 / 6)

    expert_of = [0, 0, 0, 0, 1, 1]
    for t in range(6):
        if t in dropped_tokens:
            assert torch.equal(y[0, t], torch.zeros(8)), f"token {t} should be dropped"
        else:
            e = expert_of[t]
            weight = torch.softmax(x[0, t, :2], dim=0)[e]
            expected = weight * expert_ref(x[0, t], layer.experts.w_in[e], layer.experts.w_out[e])
            torch.testing.assert_close(y[0, t], expected, rtol=1e-5, atol=1e-6)
            assert y[0, t].abs().sum() > 0


def test_probs_policy_ranks_by_router_score_even_when_top1_weights_are_renormalised():
    """Renormalised top-1 makes every combine weight exactly 1; `probs` must still rank by the
    router's score, not fall back to batch order (which is what `position` does)."""
    x = capacity_input()
    dropped = {}
    for policy in ("probs", "position"):
        layer = fixed_router_layer(num_experts=2, top_k=1, renormalize=True, capacity_factor=0.5, drop_policy=policy)
        y, _ = layer(x)
        dropped[policy] = {t for t in range(6) if torch.equal(y[0, t], torch.zeros(8))}
    assert dropped["probs"] == {0, 2}  # the two lowest scores of expert 0's four tokens
    assert dropped["position"] == {2, 3}  # the two latest of them


def test_dropped_token_is_carried_by_shared_expert_only():
    layer = fixed_router_layer(num_experts=2, top_k=1, capacity_factor=0.5, shared=1)
    x = capacity_input()
    y, _ = layer(x)
    # probs policy drops tokens 0 and 2: their output is exactly the shared expert's.
    for t in (0, 2):
        torch.testing.assert_close(y[0, t], layer.shared(x[0, t]), rtol=1e-6, atol=1e-6)
    # ...and the kept ones get their routed expert on top of it.
    assert not torch.allclose(y[0, 1], layer.shared(x[0, 1]), atol=1e-3)


def test_eval_uses_eval_capacity_factor():
    layer = fixed_router_layer(num_experts=2, top_k=1, capacity_factor=0.5, eval_capacity_factor=2.0)
    x = capacity_input()
    assert layer.training
    assert layer.capacity(6) == ceil_capacity(0.5, 6, 1, 2) == 2
    assert layer(x)[1].dropped.item() == 2
    layer.eval()
    assert layer.capacity(6) == ceil_capacity(2.0, 6, 1, 2) == 6
    assert layer.capacity(37) == ceil_capacity(2.0, 37, 1, 2) == 37
    assert layer(x)[1].dropped.item() == 0
    layer.train()
    assert layer.capacity(37) == ceil_capacity(0.5, 37, 1, 2) == 10


@pytest.mark.parametrize("tokens,experts,k,factor", [(6, 2, 1, 0.5), (16, 8, 2, 1.25), (10, 4, 2, 1.0), (3, 8, 1, 1.0)])
def test_expert_capacity_formula(tokens, experts, k, factor):
    layer = make_layer(num_experts=experts, top_k=k, dropless=False, capacity_factor=factor)
    assert layer.capacity(tokens) == expert_capacity(tokens, experts, k, factor) == ceil_capacity(factor, tokens, k, experts)
    assert make_layer(num_experts=experts, top_k=k, dropless=True).capacity(tokens) is None


def test_expert_capacity_is_exact_for_decimal_factors():
    assert expert_capacity(100, 10, 1, 1.1) == 11
    assert expert_capacity(100, 2, 1, 2.2) == 110


def test_capacity_with_top2_keeps_highest_weights_across_k_slots():
    # 4 tokens, 4 experts, top-2 (no renormalisation), capacity ceil(0.5 * 4 * 2 / 4) = 1.
    layer = fixed_router_layer(num_experts=4, top_k=2, capacity_factor=0.5)
    x = torch.randn(1, 4, 8)
    x[0, :, :4] = torch.tensor([
        [2.0, 1.0, -5.0, -5.0],  # experts 0 (high), 1
        [3.0, -5.0, 1.0, -5.0],  # experts 0 (higher), 2
        [-5.0, 2.0, -5.0, 0.0],  # experts 1, 3
        [-5.0, -5.0, 0.5, 0.0],  # experts 2, 3
    ])
    probs = torch.softmax(x[0, :, :4], dim=-1)
    y, record = layer(x)
    assert record.routed_per_expert.tolist() == [2, 2, 2, 2]
    assert record.tokens_per_expert.tolist() == [1, 1, 1, 1]
    assert record.dropped.item() == 4
    # Kept (highest weight per expert): e0 <- t1, e1 <- t2, e2 <- t3 or t1, e3 <- t3 or t2.
    keep = {}
    for e in range(4):
        candidates = [t for t in range(4) if e in probs[t].topk(2).indices.tolist()]
        keep[e] = max(candidates, key=lambda t: probs[t, e].item())
    assert keep[0] == 1 and keep[1] == 2
    expected = torch.zeros(4, 8)
    for e, t in keep.items():
        expected[t] += probs[t, e] * expert_ref(x[0, t], layer.experts.w_in[e], layer.experts.w_out[e])
    torch.testing.assert_close(y[0], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(y[0, 0], torch.zeros(8))  # token 0 lost both of its experts


# ---------------------------------------------------------------------------------------------
# plan_token_choice on hand-made decisions.
# ---------------------------------------------------------------------------------------------

IDS = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 3]])
WEIGHTS = torch.tensor([[0.2, 0.8], [0.7, 0.3], [0.9, 0.1], [0.5, 0.5]])


@pytest.mark.parametrize(
    "policy,kept",
    [
        # Expert 0 is asked by t0 (0.2), t1 (0.7), t2 (0.1), t3 (0.5) and has 2 slots.
        ("probs", {0: {(1, 0.7), (3, 0.5)}, 1: {(0, 0.8), (2, 0.9)}, 2: {(1, 0.3)}, 3: {(3, 0.5)}}),
        ("position", {0: {(0, 0.2), (1, 0.7)}, 1: {(0, 0.8), (2, 0.9)}, 2: {(1, 0.3)}, 3: {(3, 0.5)}}),
    ],
)
def test_plan_token_choice_capacity(policy, kept):
    plan = plan_token_choice(IDS, WEIGHTS, num_experts=4, capacity=2, policy=DropPolicy(policy))
    assert plan.routed_E.tolist() == [4, 2, 1, 1]
    assert plan.counts_E.tolist() == [2, 2, 1, 1]
    assert plan.dropped.item() == 2 and plan.assignments.item() == 8
    assert plan_triples(plan) == kept
    # Sorted by expert: each expert's slots are contiguous.
    assert plan.token_S.numel() == plan.counts_E.sum().item() == 6


def test_plan_token_choice_dropless_keeps_everything():
    plan = plan_token_choice(IDS, WEIGHTS, num_experts=5, capacity=None, policy=DropPolicy.probs)
    assert plan.routed_E.tolist() == [4, 2, 1, 1, 0]
    assert plan.counts_E.tolist() == [4, 2, 1, 1, 0]
    assert plan.dropped.item() == 0 and plan.assignments.item() == 8
    assert plan_triples(plan)[0] == {(0, 0.2), (1, 0.7), (2, 0.1), (3, 0.5)}


@pytest.mark.parametrize("capacity", [None, 2])
def test_plan_token_choice_skipped_assignments_are_neither_kept_nor_dropped(capacity):
    valid = torch.tensor([[True, False], [True, True], [True, True], [True, False]])  # skip (t0,e1), (t3,e3)
    plan = plan_token_choice(IDS, WEIGHTS, num_experts=4, capacity=capacity, policy=DropPolicy.probs, valid_TK=valid)
    assert plan.routed_E.tolist() == [4, 1, 1, 0]
    kept_counts = [4, 1, 1, 0] if capacity is None else [2, 1, 1, 0]
    assert plan.counts_E.tolist() == kept_counts
    assert plan.dropped.item() == (0 if capacity is None else 2)
    assert plan.assignments.item() == 6
    triples = plan_triples(plan)
    assert triples[1] == {(2, 0.9)} and triples[3] == set()

"""Auxiliary losses on hand-computed inputs, and their gradient path through a MoE layer."""

from __future__ import annotations

import math

import pytest
import torch

from moe import load_balancing_loss, router_entropy, router_z_loss
from tests.moe.reference import make_layer

# ---------------------------------------------------------------------------------------------
# load_balancing_loss: L = E * sum_e f_e * P_e
# ---------------------------------------------------------------------------------------------


def test_load_balancing_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])  # P = [0.4, 0.4, 0.2]
    # counts [1, 1, 0]: f = [1/2, 1/2, 0] -> 3 * (0.2 + 0.2) = 1.2
    loss = load_balancing_loss(probs_TE=probs, tokens_per_expert_E=torch.tensor([1, 1, 0]))
    assert loss.item() == pytest.approx(1.2, abs=1e-6)
    # counts [2, 1, 1] (top-2 over 2 tokens): f = [1/2, 1/4, 1/4] -> 3 * (0.2 + 0.1 + 0.05) = 1.05
    loss = load_balancing_loss(probs_TE=probs, tokens_per_expert_E=torch.tensor([2, 1, 1]))
    assert loss.item() == pytest.approx(1.05, abs=1e-6)
    # counts [0, 0, 4]: f = [0, 0, 1] -> 3 * 0.2 = 0.6
    loss = load_balancing_loss(probs_TE=probs, tokens_per_expert_E=torch.tensor([0, 0, 4]))
    assert loss.item() == pytest.approx(0.6, abs=1e-6)


@pytest.mark.parametrize("num_experts", [2, 4, 8])
def test_load_balancing_loss_uniform_is_one_collapse_is_e(num_experts):
    tokens = 16
    uniform = torch.full((tokens, num_experts), 1.0 / num_experts)
    counts = torch.full((num_experts,), 3)
    assert load_balancing_loss(probs_TE=uniform, tokens_per_expert_E=counts).item() == pytest.approx(1.0, abs=1e-6)

    collapsed = torch.zeros(tokens, num_experts)
    collapsed[:, 0] = 1.0
    only_first = torch.zeros(num_experts, dtype=torch.long)
    only_first[0] = tokens
    loss = load_balancing_loss(probs_TE=collapsed, tokens_per_expert_E=only_first)
    assert loss.item() == pytest.approx(num_experts, abs=1e-6)


def test_load_balancing_loss_imbalance_costs_more_than_uniform():
    """When the counts follow the probabilities (f = P, the fixed point the loss pushes towards),
    L = E * sum_e P_e^2 >= 1 by Cauchy-Schwarz, with equality only for uniform routing."""
    torch.manual_seed(0)
    num_experts, tokens = 4, 1000
    for sharpness in (0.5, 1.0, 3.0):
        probs = torch.softmax(sharpness * torch.randn(tokens, num_experts), dim=-1)
        counts = torch.multinomial(probs, 1).squeeze(1).bincount(minlength=num_experts)
        loss = load_balancing_loss(probs_TE=probs, tokens_per_expert_E=counts)
        p_mean = probs.mean(0)
        f = counts.float() / tokens
        assert loss.item() == pytest.approx(num_experts * (f * p_mean).sum().item(), rel=1e-6)
        soft = load_balancing_loss(probs_TE=probs, tokens_per_expert_E=probs.sum(0))
        assert soft.item() > 1.0
    # Top-1 routing whose probabilities all lean to expert 0: f = [1, 0, 0, 0], P_0 = 0.4 > 1/4.
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.2]]).repeat(8, 1)
    loss = load_balancing_loss(probs_TE=probs, tokens_per_expert_E=torch.tensor([8, 0, 0, 0]))
    assert loss.item() == pytest.approx(1.6, abs=1e-6)


def test_load_balancing_loss_gradient_is_e_times_f_over_t():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], requires_grad=True)
    load_balancing_loss(probs_TE=probs, tokens_per_expert_E=torch.tensor([2, 1, 1])).backward()
    # dL/dp_te = E * f_e / T = 3 * [1/2, 1/4, 1/4] / 2
    expected = torch.tensor([[0.75, 0.375, 0.375]]).repeat(2, 1)
    torch.testing.assert_close(probs.grad, expected)


# ---------------------------------------------------------------------------------------------
# router_z_loss and router_entropy
# ---------------------------------------------------------------------------------------------


def test_router_z_loss_hand_computed():
    # logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4 = 2 ln 2 -> mean of squares = 2.5 ln^2 2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert router_z_loss(logits_TE=logits).item() == pytest.approx(2.5 * math.log(2.0) ** 2, rel=1e-6)
    # Shifting logits by c shifts logsumexp by c: [[c, c]] -> (c + ln 2)^2
    assert router_z_loss(logits_TE=torch.full((3, 2), 5.0)).item() == pytest.approx((5 + math.log(2)) ** 2, rel=1e-6)


def test_router_z_loss_is_float32_for_bf16_logits():
    logits = torch.tensor([[10.0, 9.0, -3.0]], dtype=torch.bfloat16)
    loss = router_z_loss(logits_TE=logits)
    assert loss.dtype == torch.float32
    expected = math.log(math.exp(10) + math.exp(9) + math.exp(-3)) ** 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("num_experts", [2, 5, 64])
def test_router_entropy(num_experts):
    uniform = torch.full((3, num_experts), 1.0 / num_experts)
    assert router_entropy(probs_TE=uniform).item() == pytest.approx(math.log(num_experts), rel=1e-6)
    one_hot = torch.eye(num_experts)
    assert router_entropy(probs_TE=one_hot).item() == pytest.approx(0.0, abs=1e-6)


def test_router_entropy_mixed_rows():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert router_entropy(probs_TE=probs).item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Gradient path through a MoE layer's routing record.
# ---------------------------------------------------------------------------------------------


def reference_aux_loss(layer, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(x_TD.float() @ layer.router.gate.weight.float().t(), dim=-1)
    f = counts_E.float() / counts_E.sum()
    return layer.config.num_experts * (f * probs.mean(0)).sum()


def test_aux_loss_gradient_reaches_router_only():
    layer = make_layer(num_experts=4, top_k=2)
    torch.manual_seed(1)
    x = torch.randn(2, 8, 16)
    _, record = layer(x)
    record.aux_loss.backward()
    gate_grad = layer.router.gate.weight.grad.clone()
    assert gate_grad.abs().max() > 0
    # The aux loss does not touch the experts.
    assert layer.experts.w_in.grad is None and layer.experts.w_out.grad is None

    layer.zero_grad(set_to_none=True)
    reference_aux_loss(layer, x.reshape(-1, 16), record.routed_per_expert).backward()
    torch.testing.assert_close(gate_grad, layer.router.gate.weight.grad, rtol=1e-5, atol=1e-8)


def test_aux_loss_value_matches_reference_and_adds_linearly():
    layer = make_layer(num_experts=4, top_k=2)
    torch.manual_seed(2)
    x = torch.randn(2, 8, 16)
    y, record = layer(x)
    ref = reference_aux_loss(layer, x.reshape(-1, 16), record.routed_per_expert)
    assert record.aux_loss.item() == pytest.approx(ref.item(), rel=1e-6)
    gate = layer.router.gate.weight
    (task_grad,) = torch.autograd.grad(y.sum(), gate, retain_graph=True)
    (aux_grad,) = torch.autograd.grad(record.aux_loss, gate, retain_graph=True)
    (total_grad,) = torch.autograd.grad(y.sum() + 0.5 * record.aux_loss, gate)
    # Using the aux loss changes the router's gradient, by exactly coef * its own gradient.
    assert (total_grad - task_grad).abs().max() > 1e-6
    torch.testing.assert_close(total_grad, task_grad + 0.5 * aux_grad, rtol=1e-5, atol=1e-7)


def test_z_loss_in_record_matches_formula_and_reaches_gate():
    layer = make_layer(num_experts=4, top_k=1)
    torch.manual_seed(3)
    x = torch.randn(1, 8, 16)
    _, record = layer(x)
    logits = x.reshape(-1, 16) @ layer.router.gate.weight.t()
    expected = torch.logsumexp(logits, dim=-1).square().mean()
    assert record.z_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    record.z_loss.backward()
    assert layer.router.gate.weight.grad.abs().max() > 0
    assert layer.experts.w_in.grad is None


def test_record_entropy_and_prob_mean():
    layer = make_layer(num_experts=4, top_k=2)
    with torch.no_grad():
        layer.router.gate.weight.zero_()  # uniform router
    _, record = layer(torch.randn(2, 4, 16))
    assert record.router_entropy.item() == pytest.approx(math.log(4), rel=1e-6)
    torch.testing.assert_close(record.router_prob_mean, torch.full((4,), 0.25))
    assert record.aux_loss.item() == pytest.approx(1.0, abs=1e-6)  # P uniform -> L = E * sum f / E = 1


def test_load_balancing_loss_is_not_bounded_below_by_one():
    """Why the 'imbalance costs more' test above ties f to P: with f and P free, an imbalanced
    routing can score below the uniform 1. Top-1 over 2 experts: three tokens pick expert 0 at
    p = [0.5, 0.5] (a tie broken to 0), one picks expert 1 at p = [0, 1]: f = [3/4, 1/4],
    P = [3/8, 5/8], L = 2 * (3/4 * 3/8 + 1/4 * 5/8) = 0.875."""
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.0, 1.0]])
    loss = load_balancing_loss(probs_TE=probs, tokens_per_expert_E=torch.tensor([3, 1]))
    assert loss.item() == pytest.approx(0.875, abs=1e-6)

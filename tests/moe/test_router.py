"""Router families and options: aux-loss-free bias, expert choice, sequence routing, noise, GShard.

Each is checked against a naive reference or hand-computed numbers (tests/moe/reference.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from moe import DropPolicy, MoEConfig, Router, RouterConfig, Transformer, TransformerConfig
from tests.moe.reference import (
    ceil_capacity,
    expert_of_slot,
    grads,
    make_layer,
    naive_expert_choice,
    naive_moe,
    naive_sequence_moe,
    scores_ref,
)


def identity_router(config: RouterConfig, num_experts: int = 4) -> Router:
    """A router whose logits are its input: gate = identity (dim = num_experts)."""
    router = Router(config, num_experts, num_experts)
    router.reset_parameters(std=0.02)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(num_experts))
    return router


def route(router: Router, x_TD: torch.Tensor, capacity=None, seq_len=None):
    return router(x_TD, seq_len=seq_len or x_TD.shape[0], capacity=capacity, policy=DropPolicy.probs)


def assignments(plan) -> dict[int, dict[int, float]]:
    """{token: {expert: weight}} of a plan's kept assignments."""
    out: dict[int, dict[int, float]] = {}
    for e, t, w in zip(expert_of_slot(plan.counts_E).tolist(), plan.token_S.tolist(), plan.weight_S.tolist()):
        out.setdefault(t, {})[e] = w
    return out


# ---------------------------------------------------------------------------------------------
# 4. Aux-loss-free balancing (DeepSeek-V3).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_expert_bias_changes_selection_not_weights(score_func, renormalize):
    router = identity_router(RouterConfig(top_k=2, score_func=score_func, renormalize=renormalize, bias_update_rate=0.1))
    torch.manual_seed(0)
    x = torch.randn(12, 4)
    x[:, 3] = -4.0  # nobody would pick expert 3 on its own
    unbiased = assignments(route(router, x).plan)
    assert all(3 not in chosen for chosen in unbiased.values())

    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    biased = assignments(route(router, x).plan)
    for t in range(12):
        assert 3 in biased[t], "the bias must pull expert 3 into every token's top-2"
        scores = scores_ref(x[t], score_func)
        chosen = sorted(biased[t])
        expected = {e: scores[e].item() for e in chosen}
        if renormalize:
            total = sum(expected.values())
            expected = {e: w / total for e, w in expected.items()}
        assert biased[t] == pytest.approx(expected, rel=1e-6)
        # The weight of expert 3 is its tiny unbiased score, never score + bias.
        assert biased[t][3] < 0.5


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_biased_layer_matches_naive_loop(score_func):
    layer = make_layer(top_k=2, score_func=score_func, router={"bias_update_rate": 0.1})
    layer.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    torch.manual_seed(1)
    x = torch.randn(2, 6, 16)
    upstream = torch.randn_like(x)
    y, gx, gp = grads(layer, x, lambda x: layer(x)[0], upstream)
    y_ref, gx_ref, gp_ref = grads(layer, x, lambda x: naive_moe(layer, x), upstream)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gp["router.gate.weight"], gp_ref["router.gate.weight"], rtol=1e-4, atol=1e-5)


def test_update_bias_moves_by_rate_times_sign():
    router = identity_router(RouterConfig(top_k=1, bias_update_rate=0.25))
    router.expert_bias.copy_(torch.tensor([0.5, 0.0, -0.5, 1.0]))
    router.update_bias(torch.tensor([5, 1, 3, 3]))  # mean 3: over, under, even, even
    assert router.expert_bias.tolist() == [0.25, 0.25, -0.5, 1.0]
    router.update_bias(torch.tensor([0, 12, 0, 0]))  # mean 3
    assert router.expert_bias.tolist() == [0.5, 0.0, -0.25, 1.25]


def test_update_bias_is_a_noop_without_rate():
    layer = make_layer(num_experts=4, top_k=1)
    layer.update_bias(torch.tensor([10, 0, 0, 0]))
    assert torch.equal(layer.router.expert_bias, torch.zeros(4))


def test_bias_updates_balance_a_skewed_router():
    layer = make_layer(num_experts=4, top_k=1, score_func="sigmoid", router={"bias_update_rate": 0.02}, std=0.3)
    torch.manual_seed(0)
    x = torch.randn(2, 16, 16)
    x[..., 0] = 1.0
    with torch.no_grad():
        layer.router.gate.weight[:, 0] = torch.tensor([2.0, 0.0, 0.0, 0.0])  # favour expert 0
    imbalance = []
    for _ in range(30):
        _, record = layer(x)
        routed = record.routed_per_expert.float()
        imbalance.append((routed.max() / routed.mean()).item())
        layer.update_bias(record.routed_per_expert)
    assert imbalance[0] >= 2.0
    assert max(imbalance[-5:]) <= 1.25
    assert layer.router.expert_bias[0] < 0 < layer.router.expert_bias[1:].min()


def tiny_moe_model(**moe_kwargs) -> Transformer:
    config = TransformerConfig(vocab_size=32, dim=16, n_layers=3, n_heads=2, n_kv_heads=2, ffn_hidden=32, max_seq_len=8)
    moe = MoEConfig(num_experts=4, expert_hidden=8, router=RouterConfig(top_k=1, bias_update_rate=0.5), **moe_kwargs)
    torch.manual_seed(0)
    return Transformer(config, moe)


def test_transformer_update_expert_biases_and_state_dict():
    model = tiny_moe_model()
    layers = model.moe_layers()
    assert len(layers) == 3
    loads = [torch.tensor([4, 0, 0, 0]), torch.tensor([1, 1, 1, 1]), torch.tensor([0, 2, 2, 0])]
    model.update_expert_biases(loads)
    assert layers[0].router.expert_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    assert layers[1].router.expert_bias.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert layers[2].router.expert_bias.tolist() == [0.5, -0.5, -0.5, 0.5]

    state = model.state_dict()
    assert state["layers.0.ffn.router.expert_bias"].tolist() == [-0.5, 0.5, 0.5, 0.5]
    fresh = tiny_moe_model()
    assert torch.equal(fresh.moe_layers()[0].router.expert_bias, torch.zeros(4))
    fresh.load_state_dict(state)
    assert fresh.moe_layers()[2].router.expert_bias.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_update_expert_biases_rejects_a_wrong_number_of_loads():
    model = tiny_moe_model()
    with pytest.raises(ValueError):
        model.update_expert_biases([torch.tensor([4, 0, 0, 0])] * 2)  # 3 MoE layers


def test_update_expert_biases_wrong_length_leaves_biases_untouched():
    model = tiny_moe_model()
    with pytest.raises(ValueError):
        model.update_expert_biases([torch.tensor([4, 0, 0, 0])] * 2)
    for layer in model.moe_layers():
        assert torch.equal(layer.router.expert_bias, torch.zeros(4))


# ---------------------------------------------------------------------------------------------
# 5. Expert choice (Zhou et al. 2022).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k,factor", [(1, 1.0), (2, 0.5), (2, 4.0)])
def test_expert_choice_matches_naive_reference(top_k, factor):
    layer = make_layer(num_experts=4, top_k=top_k, dropless=False, capacity_factor=factor,
                       router={"kind": "expert_choice"})
    torch.manual_seed(2)
    x = torch.randn(2, 8, 16)
    capacity = layer.capacity(16)
    assert capacity == ceil_capacity(factor, 16, top_k, 4)
    y, record = layer(x)
    y_ref, dropped_ref = naive_expert_choice(layer, x, min(capacity, 16))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert record.tokens_per_expert.tolist() == [min(capacity, 16)] * 4
    assert record.dropped.item() == dropped_ref
    assert record.assignments.item() == 16
    if capacity >= 16:
        assert dropped_ref == 0  # every expert takes every token
    if factor == 0.5:
        assert dropped_ref > 0  # 4 experts x 4 slots cannot cover 16 tokens with overlaps


def test_expert_choice_gradients_match_naive_reference():
    layer = make_layer(num_experts=4, top_k=1, dropless=False, capacity_factor=1.0, router={"kind": "expert_choice"})
    torch.manual_seed(3)
    x = torch.randn(1, 12, 16)
    upstream = torch.randn_like(x)
    y, gx, gp = grads(layer, x, lambda x: layer(x)[0], upstream)
    y_ref, gx_ref, gp_ref = grads(layer, x, lambda x: naive_expert_choice(layer, x, layer.capacity(12))[0], upstream)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_expert_choice_eval_uses_eval_capacity():
    layer = make_layer(num_experts=4, top_k=1, dropless=False, capacity_factor=0.5, eval_capacity_factor=1.0,
                       router={"kind": "expert_choice"})
    x = torch.randn(1, 16, 16)
    assert layer(x)[1].tokens_per_expert.tolist() == [2] * 4
    layer.eval()
    assert layer(x)[1].tokens_per_expert.tolist() == [4] * 4


# ---------------------------------------------------------------------------------------------
# 6. Sequence-level routing.
# ---------------------------------------------------------------------------------------------


def test_sequence_routing_sends_whole_sequences_together():
    layer = make_layer(num_experts=8, top_k=2, router={"kind": "sequence"})
    torch.manual_seed(4)
    x = torch.randn(4, 5, 16)
    out = layer.router(x.reshape(-1, 16), seq_len=5, capacity=None, policy=DropPolicy.probs)
    assert out.logits_TE.shape == (4, 8)  # one decision per sequence
    per_token = assignments(out.plan)
    per_seq = []
    for b in range(4):
        tokens = [per_token[b * 5 + t] for t in range(5)]
        assert all(tok == tokens[0] for tok in tokens), f"sequence {b} was split across experts"
        per_seq.append(frozenset(tokens[0]))
    assert len(set(per_seq)) > 1, "different sequences should be able to route differently"

    y, record = layer(x)
    torch.testing.assert_close(y, naive_sequence_moe(layer, x), rtol=1e-5, atol=1e-6)
    assert record.routed_per_expert.sum().item() == 4 * 5 * 2


def test_sequence_routing_depends_on_the_mean_not_the_token():
    layer = make_layer(num_experts=8, top_k=1, router={"kind": "sequence"})
    torch.manual_seed(5)
    x = torch.randn(1, 6, 16)
    plan = layer.router(x.reshape(-1, 16), seq_len=6, capacity=None, policy=DropPolicy.probs).plan
    # Permuting tokens within the sequence keeps the mean, hence the decision and the weights.
    plan_perm = layer.router(x[0, torch.randperm(6)], seq_len=6, capacity=None, policy=DropPolicy.probs).plan
    assert torch.equal(plan.counts_E, plan_perm.counts_E)
    assert torch.equal(plan.weight_S, plan_perm.weight_S)


# ---------------------------------------------------------------------------------------------
# 7. Noisy gating, jitter, GShard random second expert.
# ---------------------------------------------------------------------------------------------

NOISY_OPTIONS = [
    {"noisy_gating": True},
    {"jitter_eps": 0.2},
    {"random_second": True},
    {"noisy_gating": True, "jitter_eps": 0.2, "random_second": True},
]


@pytest.mark.parametrize("options", NOISY_OPTIONS)
def test_noise_options_do_nothing_in_eval(options):
    plain = make_layer(top_k=2)
    noisy = make_layer(top_k=2, router=options)
    missing, unexpected = noisy.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing == (["router.noise.weight"] if options.get("noisy_gating") else [])
    plain.eval(), noisy.eval()
    x = torch.randn(2, 8, 16)
    torch.manual_seed(0)
    y1, rec1 = noisy(x)
    torch.manual_seed(1)
    y2, _ = noisy(x)
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, plain(x)[0], rtol=0, atol=0)
    assert rec1.routed_per_expert.sum().item() == 16 * 2  # no second expert skipped in eval


@pytest.mark.parametrize("options", NOISY_OPTIONS)
def test_noise_options_randomise_training(options):
    layer = make_layer(top_k=2, router=options)
    x = torch.randn(2, 8, 16)
    outputs = []
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        outputs.append(layer(x)[0])
    assert not torch.equal(outputs[0], outputs[1])
    assert torch.equal(outputs[0], outputs[2])  # reproducible given the seed


def test_jitter_perturbs_logits_within_its_bound():
    eps = 0.05
    router = Router(RouterConfig(jitter_eps=eps), 16, 8)
    x = torch.randn(64, 16)
    router.eval()
    clean = router.logits(x)
    router.train()
    jittered = router.logits(x)
    bound = eps * (x.abs() @ router.gate.weight.abs().t())  # |sum_d W x_d (u_d - 1)| <= eps sum |W x_d|
    assert (jittered - clean).abs().max() > 0
    assert ((jittered - clean).abs() <= bound + 1e-6).all()


def test_noisy_gating_noise_scale_starts_at_softplus_zero():
    router = Router(RouterConfig(noisy_gating=True), 16, 8)
    router.reset_parameters(std=0.02)
    torch.manual_seed(0)
    x = torch.randn(4096, 16)
    router.eval()
    clean = router.logits(x)
    router.train()
    noise = router.logits(x) - clean
    assert noise.mean().abs() < 0.01
    assert noise.std().item() == pytest.approx(math.log(2.0), rel=0.02)


def test_random_second_keep_rate():
    router = identity_router(RouterConfig(top_k=2, random_second=True))
    n = 4000
    x = torch.empty(3 * n, 4)
    x[:n] = torch.tensor([1.0, 0.0, -3.0, -3.0])  # top-2 = (0, 1), w2 share = 1 / (1 + e)
    x[n: 2 * n] = torch.tensor([-3.0, -3.0, 0.3, 0.0])  # top-2 = (2, 3), share = 1 / (1 + e^0.3)
    x[2 * n:] = torch.tensor([-6.0, -6.0, 0.0, 0.0])  # equal weights: share 1/2, always kept
    router.train()
    torch.manual_seed(0)
    plan = route(router, x).plan
    keep_a = min(1.0, 2.0 / (1.0 + math.e))
    keep_b = min(1.0, 2.0 / (1.0 + math.exp(0.3)))
    routed = plan.routed_E.tolist()
    kept_a, kept_b = routed[1] / n, (routed[3] - n) / n  # expert 3 also gets all of group c
    assert kept_a == pytest.approx(keep_a, abs=0.04)
    assert kept_b == pytest.approx(keep_b, abs=0.04)
    assert routed[0] == n and routed[2] == 2 * n  # first choices are never skipped
    # Skipped assignments are not drops.
    assert plan.dropped.item() == 0
    assert plan.assignments.item() == sum(routed) < 6 * n
    # Group c's second choice (share exactly 1/2) is always kept: probability min(1, 2 * 1/2).
    by_token = assignments(plan)
    assert all(len(by_token[t]) == 2 for t in range(2 * n, 3 * n))
    # The first expert keeps its renormalised weight when the second is skipped.
    w1 = 1.0 / (1.0 + math.exp(-1.0))
    assert all(by_token[t][0] == pytest.approx(w1, rel=1e-5) for t in range(0, n))


def test_random_second_skips_are_not_dropped_under_capacity():
    layer = make_layer(num_experts=4, top_k=2, dropless=False, capacity_factor=4.0, router={"random_second": True})
    torch.manual_seed(0)
    _, record = layer(torch.randn(4, 16, 16))
    assert record.dropped.item() == 0
    assert 64 < record.assignments.item() < 128  # some second choices skipped, none counted as drops
    assert record.routed_per_expert.sum().item() == record.assignments.item()
    assert record.dropped_frac.item() == 0.0

"""app/callbacks/moe_metrics.py: per-layer metrics from hand-built sums, and the callback's
accumulation over micro-batches, the once-per-step bias update and the log cadence."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from app.callbacks.moe_metrics import MoEMetrics, layer_metrics
from moe import MoEConfig, RouterConfig, RoutingRecord, Transformer, TransformerConfig

E = 4
NAMES = ("load_max_over_mean", "load_cv", "router_entropy", "dropped_frac", "aux_loss", "z_loss")


def row(kept, routed, dropped, assignments, entropy, aux, z, micro) -> list[float]:
    """The documented accumulator layout: kept (E), routed (E), dropped, assignments, entropy,
    aux, z, micro-batch count."""
    return [*kept, *routed, dropped, assignments, entropy, aux, z, micro]


# ---------------------------------------------------------------------------------------------
# layer_metrics
# ---------------------------------------------------------------------------------------------


def test_layer_metrics_hand_values():
    sums = torch.tensor([
        # balanced layer, nothing dropped; sums over 2 micro-batches
        row([4, 4, 4, 4], [4, 4, 4, 4], 0, 16, 2.0, 2.2, 0.4, 2),
        # collapsed layer: all demand on expert 0, 6 of its 16 assignments dropped
        row([10, 0, 0, 0], [16, 0, 0, 0], 6, 16, 0.2, 8.0, 1.0, 2),
    ], dtype=torch.float32)
    metrics = layer_metrics(sums, E, sums[0, -1], [1, 3])

    expected = {
        "moe/layer_1/load_max_over_mean": 1.0, "moe/layer_1/load_cv": 0.0,
        "moe/layer_1/router_entropy": 1.0, "moe/layer_1/dropped_frac": 0.0,
        "moe/layer_1/aux_loss": 1.1, "moe/layer_1/z_loss": 0.2,
        # [16, 0, 0, 0]: max 16 / mean 4; population std sqrt((144 + 3 * 16) / 4) = 4 sqrt(3)
        "moe/layer_3/load_max_over_mean": 4.0, "moe/layer_3/load_cv": math.sqrt(3),
        "moe/layer_3/router_entropy": 0.1, "moe/layer_3/dropped_frac": 6 / 16,
        "moe/layer_3/aux_loss": 4.0, "moe/layer_3/z_loss": 0.5,
        # aggregates: dropped pooled over layers, the worst layer's imbalance, losses summed
        "moe/dropped_frac": 6 / 32, "moe/load_max_over_mean": 4.0,
        "moe/aux_loss": 5.1, "moe/z_loss": 0.7,
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    assert all(isinstance(v, float) for v in metrics.values())


def test_dropped_fraction_is_pooled_not_averaged():
    # Layer A drops 1 of 2 assignments (50 %), layer B 0 of 98: pooled 1 %, the mean of ratios 25 %.
    sums = torch.tensor([row([1, 0, 0, 0], [1, 1, 0, 0], 1, 2, 0, 0, 0, 1),
                         row([49, 49, 0, 0], [49, 49, 0, 0], 0, 98, 0, 0, 0, 1)], dtype=torch.float32)
    metrics = layer_metrics(sums, E, sums[0, -1], [0, 1])
    assert metrics["moe/dropped_frac"] == pytest.approx(0.01)
    assert metrics["moe/layer_0/dropped_frac"] == pytest.approx(0.5)


def test_loads_come_from_routed_not_kept_counts():
    # Capacity evens out what the experts computed; the demand is what balancing acts on.
    sums = torch.tensor([row([2, 2, 2, 2], [8, 0, 0, 0], 6, 8, 0, 0, 0, 1)], dtype=torch.float32)
    metrics = layer_metrics(sums, E, sums[0, -1], [0])
    assert metrics["moe/layer_0/load_max_over_mean"] == pytest.approx(4.0)


# ---------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------

RATE = 0.125  # a power of two: bias values are exact


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=32, dim=16, n_layers=3, n_heads=2, n_kv_heads=1, ffn_hidden=32,
                               max_seq_len=16, moe_first_dense=1)  # MoE layers 1 and 2
    moe = MoEConfig(num_experts=E, expert_hidden=8, dropless=True,
                    router=RouterConfig(top_k=2, bias_update_rate=RATE))
    return Transformer(config, moe)


def rec(routed, aux=0.0, z=0.0, entropy=1.0) -> RoutingRecord:
    routed = torch.tensor(routed)
    return RoutingRecord(
        tokens_per_expert=routed, routed_per_expert=routed, dropped=torch.tensor(0),
        assignments=routed.sum(), router_prob_mean=torch.full((E,), 1 / E),
        router_entropy=torch.tensor(entropy), aux_loss=torch.tensor(aux), z_loss=torch.tensor(z),
    )


class Logger:
    def __init__(self):
        self.calls: list[tuple[dict, int]] = []

    def log_metrics(self, metrics, step):
        self.calls.append((metrics, step))


def fake_trainer(*, reduce=None, max_steps=100) -> SimpleNamespace:
    return SimpleNamespace(
        accumulate_grad_batches=2, global_step=0, max_steps=max_steps, logger=Logger(),
        strategy=SimpleNamespace(reduce=reduce or (lambda t, reduce_op=None: t)),
    )


def biases(model: Transformer) -> list[list[float]]:
    return [layer.router.expert_bias.tolist() for layer in model.moe_layers()]


def test_bias_moves_once_per_step_from_the_summed_loads():
    model = tiny_model()
    module = SimpleNamespace(model=model)
    trainer = fake_trainer()
    callback = MoEMetrics(log_every=10)

    # Micro-batch 1 alone would say "expert 1 is underloaded", micro-batch 2 alone "expert 0 is".
    # Summed, experts 0 and 1 are both overloaded. Per micro-batch updates or only the last
    # micro-batch's loads would give other biases.
    callback.on_train_batch_end(trainer, module, {"records": [rec([6, 0, 1, 1]), rec([1, 1, 1, 5])]}, None, 0)
    assert biases(model) == [[0.0] * E, [0.0] * E]  # mid-step: nothing moves
    trainer.global_step = 1  # Lightning has stepped the optimizer when the 2nd micro-batch ends
    callback.on_train_batch_end(trainer, module, {"records": [rec([0, 6, 1, 1]), rec([1, 1, 5, 1])]}, None, 1)
    # layer 1: [6, 6, 2, 2], mean 4 -> sign(mean - load) = [-1, -1, 1, 1]; layer 2: [2, 2, 6, 6]
    assert biases(model) == [[-RATE, -RATE, RATE, RATE], [RATE, RATE, -RATE, -RATE]]

    # The next step starts from empty sums: layer 1 [6, 2, 4, 4] -> [-1, 1, 0, 0]; layer 2 balanced.
    callback.on_train_batch_end(trainer, module, {"records": [rec([3, 1, 2, 2]), rec([2, 2, 2, 2])]}, None, 2)
    trainer.global_step = 2
    callback.on_train_batch_end(trainer, module, {"records": [rec([3, 1, 2, 2]), rec([2, 2, 2, 2])]}, None, 3)
    assert biases(model) == [[-2 * RATE, 0.0, RATE, RATE], [RATE, RATE, -RATE, -RATE]]
    assert trainer.logger.calls == []  # no log step yet


def test_bias_follows_the_loads_of_all_ranks():
    model = tiny_model()
    # The other rank routed [0, 0, 8, 8] in both layers: globally experts 2 and 3 are overloaded.
    other = torch.zeros(2, 2 * E + 6)
    other[:, E : 2 * E] = torch.tensor([0.0, 0.0, 8.0, 8.0])
    seen_ops = []

    def reduce(t, reduce_op=None):
        seen_ops.append(reduce_op)
        return t + other

    trainer = fake_trainer(reduce=reduce)
    callback = MoEMetrics(log_every=10)
    callback.on_train_batch_end(trainer, SimpleNamespace(model=model), {"records": [rec([3, 1, 0, 0])] * 2}, None, 0)
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, SimpleNamespace(model=model), {"records": [rec([3, 1, 0, 0])] * 2}, None, 1)
    assert seen_ops == ["sum"]  # once per optimizer step, summed
    # global [6, 2, 8, 8], mean 6 -> [0, 1, -1, -1]
    assert biases(model) == [[0.0, RATE, -RATE, -RATE]] * 2


def test_metrics_are_logged_on_log_steps_and_the_last_step():
    model = tiny_model()
    module = SimpleNamespace(model=model)
    trainer = fake_trainer(max_steps=5)
    callback = MoEMetrics(log_every=2)
    micro_batches = {
        1: [rec([8, 0, 0, 0], aux=9.0), rec([8, 0, 0, 0], aux=9.0)],  # step 1: not logged
        2: [rec([2, 2, 2, 2], aux=1.0, z=0.5, entropy=1.2), rec([4, 0, 2, 2], aux=3.0, z=0.25, entropy=0.8)],
    }
    batch_idx = 0
    for step in range(1, 6):
        for micro in range(2):
            trainer.global_step = step if micro == 1 else step - 1
            records = micro_batches.get(step, [rec([2, 2, 2, 2]), rec([2, 2, 2, 2])])
            callback.on_train_batch_end(trainer, module, {"records": [records[micro], records[micro]]}, None, batch_idx)
            batch_idx += 1

    assert [step for _, step in trainer.logger.calls] == [2, 4, 5]
    metrics, _ = trainer.logger.calls[0]
    expected_names = {f"moe/layer_{i}/{n}" for i in (1, 2) for n in NAMES}
    expected_names |= {"moe/dropped_frac", "moe/load_max_over_mean", "moe/aux_loss", "moe/z_loss"}
    assert set(metrics) == expected_names
    # Step 2 only (step 1's collapsed loads must not leak in): loads [6, 2, 4, 4], mean 4.
    assert metrics["moe/layer_1/load_max_over_mean"] == pytest.approx(1.5)
    assert metrics["moe/layer_1/load_cv"] == pytest.approx(math.sqrt((4 + 4 + 0 + 0) / 4) / 4)
    assert metrics["moe/layer_1/aux_loss"] == pytest.approx(2.0)  # mean over the 2 micro-batches
    assert metrics["moe/layer_1/z_loss"] == pytest.approx(0.375)
    assert metrics["moe/layer_1/router_entropy"] == pytest.approx(1.0)
    assert metrics["moe/aux_loss"] == pytest.approx(4.0)  # summed over the 2 layers
    # The load history (for the plot) has the routed share per layer at each logged step.
    assert [s for s, _ in callback.history] == [2, 4, 5]
    assert callback.history[0][1] == [pytest.approx([6 / 16, 2 / 16, 4 / 16, 4 / 16])] * 2
    assert callback.history[1][1] == [[0.25] * 4] * 2


def test_history_survives_the_checkpoint_round_trip():
    callback = MoEMetrics(log_every=1)
    callback.history = [(10, [[0.5, 0.5]]), (20, [[0.25, 0.75]])]
    restored = MoEMetrics(log_every=1)
    restored.load_state_dict(callback.state_dict())
    assert restored.history == callback.history


def test_with_real_routing_records():
    """Records straight from the model: names follow its MoE layer ids, the bias follows its loads."""
    model = tiny_model()
    tokens = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        _, first = model(tokens)
        _, second = model(tokens.flip(1))
    trainer = fake_trainer()
    callback = MoEMetrics(log_every=1)
    callback.on_train_batch_end(trainer, SimpleNamespace(model=model), {"records": first}, None, 0)
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, SimpleNamespace(model=model), {"records": second}, None, 1)

    for layer, (a, b) in enumerate(zip(first, second)):
        load = (a.routed_per_expert + b.routed_per_expert).float()
        assert int(load.sum()) == 2 * 16 * 2  # 2 micro-batches of 16 tokens, top-2
        assert biases(model)[layer] == (RATE * torch.sign(load.mean() - load)).tolist()
    (metrics, step), = trainer.logger.calls
    assert step == 1 and {k.split("/")[1] for k in metrics if k.count("/") == 2} == {"layer_1", "layer_2"}
    assert metrics["moe/dropped_frac"] == 0.0  # dropless

"""app/module.py: the LR schedule, the MoE loss terms, the optimizer groups, the training loss and
the validation metrics (loss, perplexity, bits per byte), each against hand-computed values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from app.module import MoELanguageModel, OptimConfig, clip_global_norm, global_grad_norm, moe_loss, warmup_cosine
from app.trainer import EXIT_FAILED, TrainingStopped
from moe import MoEConfig, RouterConfig, RoutingRecord, TransformerConfig


def tiny_model_config(**overrides) -> TransformerConfig:
    base = dict(vocab_size=32, dim=16, n_layers=3, n_heads=2, n_kv_heads=1, ffn_hidden=32, max_seq_len=16,
                moe_first_dense=1)
    return TransformerConfig(**{**base, **overrides})


def tiny_moe(**overrides) -> MoEConfig:
    base = dict(num_experts=4, expert_hidden=8, router=RouterConfig(top_k=2), dropless=True,
                aux_loss_coef=0.01, z_loss_coef=0.001)
    return MoEConfig(**{**base, **overrides})


def build_module(*, optim: OptimConfig | None = None, moe: MoEConfig | None = None, max_steps: int = 100,
                 token_bytes: torch.Tensor | None = None, **model) -> MoELanguageModel:
    torch.manual_seed(0)
    module = MoELanguageModel(tiny_model_config(**model), moe or tiny_moe(), optim or OptimConfig(),
                              max_steps=max_steps, token_bytes=token_bytes)
    module.configure_model()
    return module


def record(aux: float, z: float) -> RoutingRecord:
    counts = torch.tensor([1, 1, 1, 1])
    return RoutingRecord(
        tokens_per_expert=counts, routed_per_expert=counts, dropped=torch.tensor(0), assignments=torch.tensor(4),
        router_prob_mean=torch.full((4,), 0.25), router_entropy=torch.tensor(math.log(4)),
        aux_loss=torch.tensor(aux), z_loss=torch.tensor(z),
    )


# ---------------------------------------------------------------------------------------------
# warmup_cosine
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step, expected", [
    (0, 0.1),  # first warmup step: 1 / warmup
    (4, 0.5),
    (9, 1.0),  # end of warmup
    (10, 1.0),  # start of the cosine
    (60, (1 + 0.2) / 2),  # halfway through the cosine (10 + 100/2)
    (35, 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4))),  # a quarter of the way
    (110, 0.2),  # the end
    (111, 0.2),  # beyond: clamped
    (10_000, 0.2),
])
def test_warmup_cosine_hand_values(step, expected):
    assert warmup_cosine(step, warmup=10, total=110, min_ratio=0.2) == pytest.approx(expected, abs=1e-12)


def test_warmup_cosine_without_warmup_starts_at_one():
    assert warmup_cosine(0, warmup=0, total=10, min_ratio=0.0) == pytest.approx(1.0)
    assert warmup_cosine(5, warmup=0, total=10, min_ratio=0.0) == pytest.approx(0.5)
    assert warmup_cosine(10, warmup=0, total=10, min_ratio=0.0) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# moe_loss
# ---------------------------------------------------------------------------------------------


def test_moe_loss_sums_layers_and_weights_by_the_coefficients():
    records = [record(aux=1.0, z=2.0), record(aux=3.0, z=5.0), record(aux=0.5, z=0.25)]
    moe = tiny_moe(aux_loss_coef=0.1, z_loss_coef=0.01)
    weighted, aux, z = moe_loss(records, moe)
    assert float(aux) == pytest.approx(4.5)  # summed, not averaged (the mean would be 1.5)
    assert float(z) == pytest.approx(7.25)
    assert float(weighted) == pytest.approx(0.1 * 4.5 + 0.01 * 7.25)


def test_moe_loss_keeps_the_gradient_of_every_layer():
    aux_a, aux_b = torch.tensor(1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    records = [record(0, 0), record(0, 0)]
    records[0].aux_loss, records[1].aux_loss = aux_a, aux_b
    weighted, _, _ = moe_loss(records, tiny_moe(aux_loss_coef=0.3, z_loss_coef=0.0))
    weighted.backward()
    assert float(aux_a.grad) == pytest.approx(0.3) and float(aux_b.grad) == pytest.approx(0.3)


def test_moe_loss_of_a_dense_model_is_zero():
    weighted, aux, z = moe_loss([], tiny_moe())
    assert float(weighted) == float(aux) == float(z) == 0.0


# ---------------------------------------------------------------------------------------------
# configure_optimizers
# ---------------------------------------------------------------------------------------------


def test_weight_decay_groups():
    module = build_module(optim=OptimConfig(weight_decay=0.05))
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0

    named = dict(module.model.named_parameters())
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    matrices = {n for n, p in named.items() if p.dim() >= 2}
    vectors = {n for n, p in named.items() if p.dim() < 2}
    assert ids(decay["params"]) == ids(named[n] for n in matrices)
    assert ids(no_decay["params"]) == ids(named[n] for n in vectors)
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)  # each parameter once

    # What those sets are in this model: norms only without decay; every matrix incl. experts with.
    assert vectors and all(n.endswith("norm.weight") for n in vectors)
    assert {"layers.1.ffn.experts.w_in", "layers.2.ffn.experts.w_out", "layers.1.ffn.router.gate.weight",
            "embed.weight", "lm_head.weight", "layers.0.attn.wq.weight"} <= matrices
    # The router's expert bias is a buffer, updated by rule, never by the optimizer.
    biases = [b for n, b in module.model.named_buffers() if n.endswith("expert_bias")]
    assert len(biases) == 2
    assert not ids(biases) & (ids(decay["params"]) | ids(no_decay["params"]))


def test_tied_embeddings_are_in_one_group_once():
    module = build_module(tie_embeddings=True)
    optimizer = module.configure_optimizers()["optimizer"]
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(module.model.parameters()))
    assert grouped.count(id(module.model.embed.weight)) == 1


def test_learning_rate_follows_warmup_cosine():
    optim = OptimConfig(lr=0.01, min_lr_ratio=0.1, warmup_steps=4)
    module = build_module(optim=optim, max_steps=20)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    seen = []
    for _ in range(25):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    expected = [0.01 * warmup_cosine(s, warmup=4, total=20, min_ratio=0.1) for s in range(25)]
    for step, (lrs, want) in enumerate(zip(seen, expected)):
        assert lrs == pytest.approx([want, want]), step
    assert seen[0][0] == pytest.approx(0.0025) and seen[20][0] == pytest.approx(0.001)


# ---------------------------------------------------------------------------------------------
# losses()
# ---------------------------------------------------------------------------------------------


def test_losses_are_cross_entropy_plus_weighted_moe_losses():
    moe = tiny_moe(aux_loss_coef=0.5, z_loss_coef=0.25)  # large, so a missing term shows
    module = build_module(moe=moe)
    torch.manual_seed(1)
    tokens = torch.randint(0, 32, (2, 9))
    out = module.losses(tokens)

    with torch.no_grad():
        logits, records = module.model(tokens[:, :-1])  # deterministic: no noise, no capacity
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    nll = [-float(log_probs[b, t, tokens[b, t + 1]]) for b in range(2) for t in range(8)]
    ce = sum(nll) / len(nll)
    aux = sum(float(r.aux_loss) for r in records)
    z = sum(float(r.z_loss) for r in records)
    assert len(records) == 2 and len(out["records"]) == 2
    assert float(out["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(out["aux"]) == pytest.approx(aux, rel=1e-5)
    assert float(out["z"]) == pytest.approx(z, rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(ce + 0.5 * aux + 0.25 * z, rel=1e-5)
    assert out["loss"].requires_grad and not out["ce"].requires_grad


def test_loss_gradient_reaches_the_router():
    module = build_module(moe=tiny_moe(aux_loss_coef=1.0))
    out = module.losses(torch.randint(0, 32, (2, 9)))
    out["loss"].backward()
    gate = module.model.layers[1].ffn.router.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------


def grads_after(clip, module: MoELanguageModel):
    """The gradients of one fixed batch after `clip(params)`, and what `clip` returned."""
    module.zero_grad()
    torch.manual_seed(2)
    module.losses(torch.randint(0, 32, (2, 9)))["loss"].backward()
    params = [p for p in module.parameters() if p.grad is not None]
    returned = clip(params)
    return [p.grad.clone() for p in params], returned


def global_norm(grads: list[torch.Tensor]) -> float:
    return float(torch.stack([g.norm() for g in grads]).norm())


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipped, and left alone
def test_clip_global_norm_matches_torch(max_norm):
    module = build_module()
    ours, our_norm = grads_after(lambda ps: clip_global_norm(ps, max_norm), module)
    theirs, their_norm = grads_after(lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm), module)
    assert float(our_norm) == pytest.approx(float(their_norm), rel=1e-5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert global_norm(ours) == pytest.approx(min(float(our_norm), max_norm), rel=1e-4)


def test_configure_gradient_clipping_uses_the_trainer_value():
    module = build_module()
    unclipped, _ = grads_after(lambda ps: None, module)
    assert global_norm(unclipped) > 1e-2
    clipped, _ = grads_after(lambda ps: module.configure_gradient_clipping(None, gradient_clip_val=1e-2), module)
    assert global_norm(clipped) == pytest.approx(1e-2, rel=1e-4)
    untouched, _ = grads_after(lambda ps: module.configure_gradient_clipping(None, gradient_clip_val=None), module)
    for a, b in zip(untouched, unclipped):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The gate before the optimizer step: non-finite losses and gradients
# ---------------------------------------------------------------------------------------------


def trained_micro_batches(module: MoELanguageModel, count: int, *, global_step: int = 6) -> None:
    """What Lightning does before an optimizer step: `count` training steps with their backward."""
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda t, reduce_op=None: t),
                                     global_step=global_step, global_rank=0, is_global_zero=True)
    module.log = lambda *args, **kwargs: None  # Lightning's progress-bar logging needs a real loop
    module.zero_grad()
    torch.manual_seed(3)
    for index in range(count):
        batch = {"tokens": torch.randint(0, 32, (2, 9)), "index": torch.tensor(index)}
        (module.training_step(batch, index)["loss"] / count).backward()


def stop_message(module: MoELanguageModel) -> str:
    with pytest.raises(TrainingStopped) as err:
        module.on_before_optimizer_step(None)
    assert err.value.exit_code == EXIT_FAILED and err.value.mlflow_status == "FAILED"
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_nan_router_weight_stops_the_step_naming_the_router_logits():
    module = build_module()
    with torch.no_grad():
        module.model.layers[2].ffn.router.gate.weight[1, 3] = float("nan")
    trained_micro_batches(module, 1)
    assert stop_message(module) == (
        "non-finite loss at step 7: first non-finite value in layers.2.ffn.router output logits_TE "
        "(non-finite weights: layers.2.ffn.router.gate.weight); the weights were not updated")


def test_an_inf_expert_weight_names_the_moe_layer_and_the_weight_and_the_micro_batch():
    module = build_module()
    with torch.no_grad():
        module.model.layers[1].ffn.experts.w_in[0, 2, 5] = float("inf")
    trained_micro_batches(module, 3)
    # The experts run inside one autograd function, not as a module: the MoE layer's output is the
    # first non-finite one, and its non-finite weight says why. Every micro-batch is non-finite.
    assert stop_message(module) == (
        "non-finite loss at step 7 (micro-batch 1 of 3): first non-finite value in layers.1.ffn output [0] "
        "(non-finite weights: layers.1.ffn.experts.w_in); the weights were not updated")


def test_a_non_finite_gradient_names_the_parameter_nearest_the_loss():
    module = build_module()
    trained_micro_batches(module, 2)
    named = dict(module.model.named_parameters())
    named["embed.weight"].grad[4, 1] = float("nan")
    named["layers.1.attn.wq.weight"].grad[0, 0] = float("-inf")
    assert stop_message(module) == (
        f"non-finite gradient at step 7: 2 of {len(named)} parameters, the nearest the loss being "
        "layers.1.attn.wq.weight; the weights were not updated")


def test_under_a_grad_scaler_overflowing_gradients_are_left_to_it_but_a_nan_loss_is_not():
    module = build_module()
    trained_micro_batches(module, 1)
    module.trainer.precision_plugin = SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))  # 16-mixed
    module.model.lm_head.weight.grad[0, 0] = float("inf")  # the scaler skips this step and lowers the scale
    module.on_before_optimizer_step(None)  # nothing raised
    with torch.no_grad():
        module.model.layers[1].ffn.router.gate.weight[0, 0] = float("nan")
    trained_micro_batches(module, 1)
    module.trainer.precision_plugin = SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))
    assert stop_message(module).startswith("non-finite loss at step 7: first non-finite value in layers.1.ffn.router")


def test_finite_steps_pass_and_clipping_reuses_the_measured_norm():
    module = build_module()
    trained_micro_batches(module, 2)
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None]))
    module.on_before_optimizer_step(None)  # nothing raised
    assert module._grad_norm == pytest.approx(expected, rel=1e-6)
    module.configure_gradient_clipping(None, gradient_clip_val=expected / 4)
    after = float(torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None]))
    assert after == pytest.approx(expected / 4, rel=1e-4)


def test_huge_but_finite_gradients_are_measured_exactly_not_refused():
    module = build_module()
    trained_micro_batches(module, 1)
    params = [p for p in module.parameters() if p.grad is not None]
    for p in params:
        p.grad.mul_(1e22)  # every square overflows float32; every value is finite
    assert not torch.isfinite(global_grad_norm(params))
    exact = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))
    module.on_before_optimizer_step(None)  # nothing raised: the gradients are finite
    assert module._grad_norm == pytest.approx(exact, rel=1e-9)
    module.configure_gradient_clipping(None, gradient_clip_val=1.0)
    assert math.sqrt(sum(float(p.grad.double().square().sum()) for p in params)) == pytest.approx(1.0, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Validation metrics
# ---------------------------------------------------------------------------------------------


class FixedLogits(nn.Module):
    """Stands in for the transformer: the same logits (T, V) for every sequence."""

    def __init__(self, logits_TV: torch.Tensor):
        super().__init__()
        self.logits_TV = logits_TV

    def forward(self, tokens_BT):
        batch, seq_len = tokens_BT.shape
        return self.logits_TV[:seq_len].expand(batch, seq_len, -1).clone(), []


def attach(module: MoELanguageModel) -> None:
    # One process: all-reduce is the identity.
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda t, reduce_op=None: t),
                                     sanity_checking=False, global_step=0, logger=None)


V = 8
TOKEN_BYTES = torch.tensor([0, 1, 2, 3, 1, 1, 4, 2])  # id 0 is a special token


def test_bits_per_byte_with_uniform_logits():
    module = build_module(token_bytes=TOKEN_BYTES, vocab_size=V)
    module.model = FixedLogits(torch.zeros(16, V))  # uniform: every target costs ln V nats
    attach(module)
    tokens = torch.tensor([[3, 0, 5, 6, 0, 2], [1, 1, 7, 0, 4, 3]])
    module.on_validation_epoch_start()
    module.validation_step({"tokens": tokens}, 0)
    metrics = module.validation_metrics()

    targets = [0, 5, 6, 0, 2, 1, 7, 0, 4, 3]  # tokens[:, 1:]
    with_bytes = [t for t in targets if TOKEN_BYTES[t] > 0]  # 7 tokens, 3 end-of-text
    total_bytes = sum(int(TOKEN_BYTES[t]) for t in targets)  # 1+4+2+1+2+1+3 = 14
    assert total_bytes == 14
    assert metrics["val/loss"] == pytest.approx(math.log(V))
    assert metrics["val/ppl"] == pytest.approx(V)
    assert metrics["val/bits_per_byte"] == pytest.approx(len(with_bytes) * math.log(V) / 14 / math.log(2))


def test_bits_per_byte_accumulates_over_batches_and_resets_per_epoch():
    torch.manual_seed(3)
    logits = torch.randn(16, V) * 2
    module = build_module(token_bytes=TOKEN_BYTES, vocab_size=V)
    module.model = FixedLogits(logits)
    attach(module)
    batches = [torch.randint(0, V, (3, 7)), torch.randint(0, V, (2, 7))]
    batches[0][0, 3] = 0  # make sure a special token is among the targets

    # Reference: a plain loop over every target.
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    nll_sum = nll_with_bytes = byte_sum = count = 0.0
    for tokens in batches:
        for row in tokens.tolist():
            for t in range(len(row) - 1):
                nll = -float(log_probs[t, row[t + 1]])
                nbytes = int(TOKEN_BYTES[row[t + 1]])
                nll_sum, count, byte_sum = nll_sum + nll, count + 1, byte_sum + nbytes
                nll_with_bytes += nll if nbytes > 0 else 0.0

    module.on_validation_epoch_start()
    module.validation_step({"tokens": torch.zeros(2, 7, dtype=torch.long)}, 0)  # a previous epoch
    module.on_validation_epoch_start()
    for i, tokens in enumerate(batches):
        module.validation_step({"tokens": tokens}, i)
    metrics = module.validation_metrics()
    assert metrics["val/loss"] == pytest.approx(nll_sum / count, rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(nll_sum / count), rel=1e-5)
    assert metrics["val/bits_per_byte"] == pytest.approx(nll_with_bytes / byte_sum / math.log(2), rel=1e-5)


def test_validation_metrics_use_the_all_reduced_sums():
    module = build_module(token_bytes=TOKEN_BYTES, vocab_size=V)
    module.model = FixedLogits(torch.zeros(16, V))
    other_rank = torch.tensor([10 * math.log(V), 10.0, 0.0, 6.0])  # 10 special-token targets elsewhere
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda t, reduce_op=None: t + other_rank))
    module.validation_step({"tokens": torch.tensor([[1, 2, 3]])}, 0)  # 2 targets, 5 bytes
    metrics = module.validation_metrics()
    assert metrics["val/loss"] == pytest.approx(math.log(V))
    assert metrics["val/bits_per_byte"] == pytest.approx(2 * math.log(V) / 11 / math.log(2))


def test_without_token_bytes_every_token_counts_one_byte():
    module = build_module(vocab_size=V)
    module.model = FixedLogits(torch.zeros(16, V))
    attach(module)
    module.validation_step({"tokens": torch.tensor([[0, 1, 2, 0]])}, 0)
    assert module.validation_metrics()["val/bits_per_byte"] == pytest.approx(math.log(V) / math.log(2))


def test_no_validation_batches_no_metrics():
    module = build_module()
    attach(module)
    module.on_validation_epoch_start()
    assert module.validation_metrics() == {}


def test_checkpoint_carries_the_config_and_run_id():
    module = MoELanguageModel(tiny_model_config(), tiny_moe(), OptimConfig(), max_steps=10, config_yaml="model:\n  dim: 16\n")
    module.trainer = SimpleNamespace(logger=SimpleNamespace(run_id="abc123"))
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint == {"experiment_config": "model:\n  dim: 16\n", "mlflow_run_id": "abc123"}

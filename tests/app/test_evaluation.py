"""app/evaluation.py and app/checkpoint.load_weights, in process on a tiny model (no training).

References are independent of the code under test: cross entropy from our own forward passes over
windows we slice ourselves, bits per byte summed by hand, expert assignments recomputed from the
router's input (softmax, top-k, capacity by score), and per-source evaluations run one at a time.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from app.checkpoint import load_weights
from app.errors import UserError
from app.evaluation import RoutingStats, evaluate, top_tokens, windows
from moe import MoEConfig, RouterConfig, Transformer, TransformerConfig

V, T, E, K = 40, 8, 4, 2
EVAL_CAPACITY = 0.5  # slots = ceil(0.5 * N * K / E): experts overflow, so dropping is exercised


def tiny_model(seed: int = 0, *, kind: str = "moe", dim: int = 16) -> Transformer:
    torch.manual_seed(seed)
    config = TransformerConfig(kind=kind, vocab_size=V, dim=dim, n_layers=2, n_heads=2, n_kv_heads=1,
                               ffn_hidden=24, max_seq_len=T)
    moe = MoEConfig(num_experts=E, expert_hidden=8, router=RouterConfig(top_k=K), eval_capacity_factor=EVAL_CAPACITY)
    model = Transformer(config, moe if kind == "moe" else None)
    with torch.no_grad():  # decisive routing: no near-ties between experts
        for layer in model.moe_layers():
            layer.router.gate.weight.mul_(50.0)
    return model


def token_ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=n).astype(np.int64)


def hand_token_bytes() -> torch.Tensor:
    bytes_V = torch.from_numpy(np.random.default_rng(7).integers(1, 6, size=V)).long()
    bytes_V[0] = 0  # a special token: no bytes
    bytes_V[5] = 0
    return bytes_V


def my_windows(ids: np.ndarray, count: int) -> torch.Tensor:
    """count windows of T+1 tokens, window i starting at i*T (they share their boundary token)."""
    return torch.stack([torch.from_numpy(ids[i * T : i * T + T + 1]) for i in range(count)])


def reference_nll(model: Transformer, windows_NT1: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-token negative log-likelihood from our own forward passes (capacity is per batch, so
    the batches are the evaluator's: consecutive groups of batch_size windows)."""
    model.eval()
    out = []
    with torch.no_grad():
        for batch in windows_NT1.split(batch_size):
            logits, _ = model(batch[:, :-1])
            log_p = torch.log_softmax(logits.double(), dim=-1)
            out.append(-log_p.gather(-1, batch[:, 1:, None]).squeeze(-1).flatten())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# windows
# ---------------------------------------------------------------------------------------------


def test_windows_are_consecutive_and_share_their_boundary_token():
    ids = np.arange(100, 123)  # 23 tokens: (23 - 1) // 5 = 4 windows of 6
    got = windows(ids, 5, None)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [[100, 101, 102, 103, 104, 105], [105, 106, 107, 108, 109, 110],
                                        [110, 111, 112, 113, 114, 115], [115, 116, 117, 118, 119, 120]])
    np.testing.assert_array_equal(windows(ids, 5, 2), got[:2])
    np.testing.assert_array_equal(windows(ids, 5, 99), got)
    assert windows(ids[:5], 5, None).shape == (0, 6)  # fewer than T + 1 tokens: no window
    assert windows(ids[:6], 5, None).shape == (1, 6)


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def test_loss_ppl_and_bits_per_byte_equal_a_hand_computation():
    model = tiny_model()
    ids = token_ids(60, seed=1)  # (60 - 1) // 8 = 7 windows, batches of 3, 3 and 1
    bytes_V = hand_token_bytes()
    result = evaluate(model, {"text": ids}, bytes_V, seq_len=T, batch_size=3)
    score = result.scores["text"]

    ref_windows = my_windows(ids, 7)
    nll = reference_nll(model, ref_windows, batch_size=3)
    targets = ref_windows[:, 1:].flatten()
    assert score.tokens == 7 * T == nll.numel()
    assert score.loss == pytest.approx(nll.mean().item(), rel=1e-5)
    assert score.ppl == pytest.approx(math.exp(score.loss), rel=1e-5)
    bytes_T = bytes_V[targets].double()
    assert (bytes_T == 0).any() and (bytes_T > 0).any()  # both kinds of target occur
    expected_bpb = (nll * (bytes_T > 0)).sum().item() / bytes_T.sum().item() / math.log(2)
    assert score.bits_per_byte == pytest.approx(expected_bpb, rel=1e-5)


def test_max_windows_scores_only_the_first_windows():
    model = tiny_model()
    ids = token_ids(60, seed=1)
    score = evaluate(model, {"text": ids}, hand_token_bytes(), seq_len=T, batch_size=16, max_windows=2).scores["text"]
    nll = reference_nll(model, my_windows(ids, 2), batch_size=16)
    assert score.tokens == 2 * T
    assert score.loss == pytest.approx(nll.mean().item(), rel=1e-5)


def test_batching_changes_the_loss_only_through_capacity():
    """With room for every assignment (dropless), the batch size cannot change the loss."""
    model = tiny_model()
    for layer in model.moe_layers():
        layer.config.dropless = True
    ids, bytes_V = token_ids(60, seed=1), hand_token_bytes()
    one = evaluate(model, {"t": ids}, bytes_V, seq_len=T, batch_size=1).scores["t"]
    all_ = evaluate(model, {"t": ids}, bytes_V, seq_len=T, batch_size=16).scores["t"]
    assert one.loss == pytest.approx(all_.loss, rel=1e-5)
    assert one.bits_per_byte == pytest.approx(all_.bits_per_byte, rel=1e-5)


def test_a_source_too_short_for_one_window_does_not_score_as_perfect():
    model = tiny_model()
    score = evaluate(model, {"short": token_ids(T, seed=3)}, hand_token_bytes(), seq_len=T, batch_size=4).scores["short"]
    assert score.tokens == 0
    assert math.isnan(score.ppl)
    assert math.isnan(score.loss) and math.isnan(score.bits_per_byte)


# ---------------------------------------------------------------------------------------------
# Routing statistics
# ---------------------------------------------------------------------------------------------


def hand_routing(model: Transformer, inputs_BT: torch.Tensor) -> list[dict]:
    """Per MoE layer, from the router's own input: which (token, expert) assignments were chosen
    (softmax, top-K) and which of them an expert kept (its `capacity` best by router score)."""
    captured = []
    hooks = [layer.router.register_forward_hook(lambda mod, args, out: captured.append((mod, args[0])))
             for layer in model.moe_layers()]
    try:
        with torch.no_grad():
            model(inputs_BT)
    finally:
        for hook in hooks:
            hook.remove()
    flat_ids = inputs_BT.flatten().tolist()
    n = len(flat_ids)
    capacity = math.ceil(EVAL_CAPACITY * n * K / E)
    layers = []
    for router, x_TD in captured:
        probs = torch.softmax(x_TD.double() @ router.gate.weight.double().t(), dim=-1)
        chosen = torch.topk(probs, K, dim=-1).indices.tolist()
        routed = [0] * E
        candidates = {e: [] for e in range(E)}
        for t in range(n):
            for e in chosen[t]:
                routed[e] += 1
                candidates[e].append((probs[t, e].item(), t))
        counts = np.zeros((E, V), np.int64)
        kept = [0] * E
        for e, cands in candidates.items():
            for _, t in sorted(cands, reverse=True)[:capacity]:
                counts[e, flat_ids[t]] += 1
                kept[e] += 1
        layers.append({"routed": routed, "kept": kept, "counts": counts, "capacity": capacity})
    return layers


def test_routing_stats_equal_a_hand_recomputation_of_one_batch():
    model = tiny_model()
    ids = token_ids(60, seed=1)
    result = evaluate(model, {"text": ids}, hand_token_bytes(), seq_len=T, batch_size=16)  # one batch of 7
    stats = result.routing
    assert stats is not None and stats.layer_ids == [0, 1]

    hand = hand_routing(model, my_windows(ids, 7)[:, :-1])
    n = 7 * T
    for j, layer in enumerate(hand):
        assert max(layer["routed"]) > layer["capacity"], "the test needs an overflowing expert"
        np.testing.assert_array_equal(stats.routed_LE[j], layer["routed"])
        np.testing.assert_array_equal(stats.kept_LE[j], layer["kept"])
        np.testing.assert_array_equal(stats.token_counts_LEV[j], layer["counts"])
        assert stats.assignments_L[j] == n * K
        assert stats.dropped_L[j] == sum(max(r - layer["capacity"], 0) for r in layer["routed"]) > 0
    # Kept assignments: per layer, what the experts computed adds up, whichever way it is counted.
    np.testing.assert_array_equal(stats.kept_LE.sum(axis=1), stats.assignments_L - stats.dropped_L)
    np.testing.assert_array_equal(stats.token_counts_LEV.sum(axis=2), stats.kept_LE)
    np.testing.assert_array_equal(stats.source_counts_LES[:, :, 0], stats.kept_LE)
    np.testing.assert_allclose(stats.dropped_frac_L, stats.dropped_L / (n * K))


def test_routing_stats_accumulate_over_batches():
    model = tiny_model()
    ids = token_ids(60, seed=1)
    stats = evaluate(model, {"text": ids}, hand_token_bytes(), seq_len=T, batch_size=3).routing
    ref_windows = my_windows(ids, 7)
    hands = [hand_routing(model, batch[:, :-1]) for batch in ref_windows.split(3)]
    for j in range(2):
        np.testing.assert_array_equal(stats.kept_LE[j], np.sum([h[j]["kept"] for h in hands], axis=0))
        np.testing.assert_array_equal(stats.routed_LE[j], np.sum([h[j]["routed"] for h in hands], axis=0))
        np.testing.assert_array_equal(stats.token_counts_LEV[j], np.sum([h[j]["counts"] for h in hands], axis=0))
    assert stats.assignments_L.tolist() == [7 * T * K] * 2


def test_source_counts_split_kept_assignments_per_source():
    model = tiny_model()
    bytes_V = hand_token_bytes()
    a, b = token_ids(60, seed=1), token_ids(45, seed=2)
    both = evaluate(model, {"a": a, "b": b}, bytes_V, seq_len=T, batch_size=4)
    alone = [evaluate(model, {name: ids}, bytes_V, seq_len=T, batch_size=4) for name, ids in (("a", a), ("b", b))]

    assert list(both.scores) == ["a", "b"]
    assert both.routing.source_counts_LES.shape == (2, E, 2)
    for s, single in enumerate(alone):
        name = list(single.scores)[0]
        assert both.scores[name].loss == pytest.approx(single.scores[name].loss, rel=1e-6)
        np.testing.assert_array_equal(both.routing.source_counts_LES[:, :, s], single.routing.kept_LE)
        assert single.routing.source_counts_LES[:, :, 0].sum() > 0
    np.testing.assert_array_equal(both.routing.kept_LE, alone[0].routing.kept_LE + alone[1].routing.kept_LE)
    np.testing.assert_array_equal(both.routing.token_counts_LEV,
                                  alone[0].routing.token_counts_LEV + alone[1].routing.token_counts_LEV)
    np.testing.assert_array_equal(both.routing.source_counts_LES.sum(axis=2), both.routing.kept_LE)


def test_dense_model_has_scores_and_no_routing():
    model = tiny_model(kind="dense")
    ids = token_ids(60, seed=1)
    result = evaluate(model, {"text": ids}, hand_token_bytes(), seq_len=T, batch_size=4)
    assert result.routing is None
    nll = reference_nll(model, my_windows(ids, 7), batch_size=4)
    assert result.scores["text"].loss == pytest.approx(nll.mean().item(), rel=1e-5)


def test_evaluation_removes_its_router_hooks():
    model = tiny_model()
    evaluate(model, {"text": token_ids(30, seed=1)}, hand_token_bytes(), seq_len=T, batch_size=4)
    assert all(not layer.router._forward_hooks for layer in model.moe_layers())


# ---------------------------------------------------------------------------------------------
# top_tokens
# ---------------------------------------------------------------------------------------------


def test_top_tokens_orders_by_count_then_id_and_skips_unseen_tokens():
    counts = np.zeros((2, 2, 6), np.int64)
    counts[0, 0] = [0, 5, 2, 5, 0, 1]  # a tie at 5: the lower id first
    counts[1, 0] = [1, 0, 0, 0, 0, 0]  # fewer seen tokens than k
    counts[1, 1] = [0, 0, 0, 0, 9, 3]
    stats = RoutingStats(layer_ids=[1, 3], kept_LE=counts.sum(2), routed_LE=counts.sum(2), dropped_L=np.zeros(2),
                         assignments_L=counts.sum((1, 2)), token_counts_LEV=counts,
                         source_counts_LES=counts.sum(2)[..., None])
    table = top_tokens(stats, lambda i: f"<{i}>", k=3)
    assert table == {
        1: [[("<1>", 5), ("<3>", 5), ("<2>", 2)], []],
        3: [[("<0>", 1)], [("<4>", 9), ("<5>", 3)]],
    }
    assert top_tokens(stats, str, k=1)[1][0] == [("1", 5)]


# ---------------------------------------------------------------------------------------------
# load_weights
# ---------------------------------------------------------------------------------------------


def save_file_checkpoint(model: Transformer, path) -> str:
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 3}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_weights_restores_a_file_checkpoint_exactly_and_reads_only(tmp_path):
    saved = tiny_model(seed=1)
    with torch.no_grad():
        saved.moe_layers()[0].router.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))  # a buffer too
    path = tmp_path / "step-0000003.ckpt"
    digest = save_file_checkpoint(saved, path)

    fresh = tiny_model(seed=2)
    assert not torch.equal(fresh.embed.weight, saved.embed.weight)
    load_weights(path, fresh)
    want, got = saved.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    tokens = torch.from_numpy(token_ids(2 * T, seed=5)).view(2, T)
    saved.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens)[0], saved(tokens)[0], rtol=0, atol=0)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_load_weights_of_another_shape_is_a_one_line_user_error(tmp_path):
    path = tmp_path / "wide.ckpt"
    save_file_checkpoint(tiny_model(seed=1, dim=32), path)
    with pytest.raises(UserError) as err:
        load_weights(path, tiny_model(seed=2, dim=16))
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert "do not fit" in message
    assert err.value.__suppress_context__  # `from None`: no chained torch traceback


def test_load_weights_shape_error_names_the_mismatching_weight(tmp_path):
    path = tmp_path / "wide.ckpt"
    save_file_checkpoint(tiny_model(seed=1, dim=32), path)
    with pytest.raises(UserError) as err:
        load_weights(path, tiny_model(seed=2, dim=16))
    assert "embed.weight" in str(err.value) and "\n" not in str(err.value)


def test_load_weights_of_a_dense_checkpoint_into_an_moe_model_is_a_user_error(tmp_path):
    path = tmp_path / "dense.ckpt"
    save_file_checkpoint(tiny_model(seed=1, kind="dense"), path)
    with pytest.raises(UserError, match="do not fit"):
        load_weights(path, tiny_model(seed=2))

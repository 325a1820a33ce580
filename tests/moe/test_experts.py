"""Experts: SwiGLU and GroupedExperts against explicit per-expert matmuls; grouped_mm vs loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe import GroupedExperts, SwiGLU
from tests.moe.reference import expert_ref


def grouped(num_experts=4, dim=16, hidden=8, impl="loop", seed=0, dtype=torch.float32) -> GroupedExperts:
    torch.manual_seed(seed)
    experts = GroupedExperts(num_experts, dim, hidden, impl)
    experts.reset_parameters(std=0.5, out_std=0.5)
    return experts.to(dtype)


def per_expert_reference(experts: GroupedExperts, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
    rows, start = [], 0
    for e, n in enumerate(counts):
        for s in range(start, start + n):
            rows.append(expert_ref(x_SD[s], experts.w_in[e], experts.w_out[e]))
        start += n
    return torch.stack(rows)


def test_swiglu_matches_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(16, 8).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    expected = torch.stack([expert_ref(x_D, ffn.w_in.weight.t(), ffn.w_out.weight.t()) for x_D in x])
    torch.testing.assert_close(ffn(x), expected)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 7], [1, 1, 1, 1]])
def test_grouped_experts_match_per_expert_reference(impl, counts):
    experts = grouped(impl=impl)
    torch.manual_seed(1)
    x = torch.randn(sum(counts), 16, requires_grad=True)
    y = experts(x, torch.tensor(counts))
    expected = per_expert_reference(experts, x, counts)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # Backward: an expert with no rows gets an exactly-zero gradient (never None, never garbage).
    y.square().sum().backward()
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.equal(experts.w_in.grad[e], torch.zeros_like(experts.w_in.grad[e]))
        else:
            assert experts.w_in.grad[e].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grouped_mm_matches_loop_per_dtype(dtype):
    loop, gmm = grouped(impl="loop", dtype=dtype), grouped(impl="grouped_mm", dtype=dtype)
    counts = torch.tensor([4, 0, 7, 5])
    torch.manual_seed(2)
    x = torch.randn(16, 16, dtype=dtype)
    upstream = torch.randn(16, 16, dtype=dtype)
    outs = []
    for experts in (loop, gmm):
        x_ = x.clone().requires_grad_(True)
        y = experts(x_, counts)
        (y * upstream).sum().backward()
        outs.append((y.detach(), x_.grad, experts.w_in.grad, experts.w_out.grad))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)
    for a, b in zip(*outs):
        assert b.dtype == dtype
        torch.testing.assert_close(b, a, **tol)


def test_grouped_mm_backward_through_sum():
    """grouped_mm's backward rejects stride-0 gradients (from .sum()); the layer makes them contiguous."""
    experts = grouped(impl="grouped_mm")
    x = torch.randn(6, 16, requires_grad=True)
    experts(x, torch.tensor([2, 2, 1, 1])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_grouped_mm_limits_on_this_cpu():
    """F.grouped_mm here: no float64, and rows must be 16-byte aligned. GroupedExperts refuses
    misaligned widths when it is built, not at the first forward."""
    x64 = torch.randn(4, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Float32, BFloat16 or Float16"):
        F.grouped_mm(x64, torch.randn(2, 16, 8, dtype=torch.float64), offs=torch.tensor([2, 4], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="16 bytes"):
        F.grouped_mm(torch.randn(4, 6), torch.randn(2, 6, 6), offs=torch.tensor([2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="divisible by 8"):
        grouped(impl="grouped_mm", dim=6, hidden=3)
    # The loop implementation has neither limit.
    loop = grouped(impl="loop", dim=6, hidden=3).double()
    assert loop(torch.randn(4, 6, dtype=torch.float64), torch.tensor([1, 1, 1, 1])).shape == (4, 6)


def test_bf16_autocast_computes_experts_in_bf16_with_fp32_grads():
    experts = grouped(impl="loop")
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, torch.tensor([2, 2, 2, 2]))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert experts.w_in.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), per_expert_reference(experts, x, [2, 2, 2, 2]), rtol=5e-2, atol=5e-2)


def test_grouped_experts_are_initialised_at_construction():
    torch.manual_seed(0)
    a = GroupedExperts(4, 16, 8)
    torch.manual_seed(0)
    b = GroupedExperts(4, 16, 8)
    torch.manual_seed(1)
    c = GroupedExperts(4, 16, 8)
    for w in (a.w_in, a.w_out):
        assert torch.isfinite(w).all() and 0 < w.std() < 1
    assert torch.equal(a.w_in, b.w_in) and not torch.equal(a.w_in, c.w_in)


def combine_reference(experts: GroupedExperts, x_TD, token_S, weight_S, counts: list[int]):
    """out_t = sum over slots s of token t of weight_S[s] * expert(s)(x_t), one slot at a time."""
    out = [torch.zeros_like(x_TD[0]) for _ in range(x_TD.shape[0])]
    expert_S = [e for e, n in enumerate(counts) for _ in range(n)]
    for s, (e, t) in enumerate(zip(expert_S, token_S.tolist())):
        out[t] = out[t] + weight_S[s] * expert_ref(x_TD[t], experts.w_in[e], experts.w_out[e])
    return torch.stack(out)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("hidden", [8, 32])  # the combine weight scales the activation (F < D) or the output
def test_combine_tokens_matches_per_slot_reference_forward_and_backward(impl, hidden):
    dtype = torch.float64 if impl == "loop" else torch.float32  # grouped_mm has no float64
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    experts = grouped(impl=impl, hidden=hidden, dtype=dtype)
    counts = [3, 0, 5, 2]  # expert 1 gets no rows: its weight gradient must be exactly zero
    generator = torch.Generator().manual_seed(3)
    token_S = torch.randint(0, 6, (sum(counts),), generator=generator)
    inputs = {"x": torch.randn(6, 16, dtype=dtype, generator=generator),
              "weight": torch.rand(sum(counts), dtype=dtype, generator=generator)}
    upstream = torch.randn(6, 16, dtype=dtype, generator=generator)

    def run(fn):
        experts.zero_grad(set_to_none=True)
        x, weight = (t.clone().requires_grad_(True) for t in inputs.values())
        y = fn(x, weight)
        (y * upstream).sum().backward()
        return y.detach(), x.grad, weight.grad, experts.w_in.grad.clone(), experts.w_out.grad.clone()

    got = run(lambda x, w: experts.combine_tokens(x, token_S, w, torch.tensor(counts)))
    want = run(lambda x, w: combine_reference(experts, x, token_S, w, counts))
    for name, a, b in zip(["out", "d(x)", "d(weight)", "d(w_in)", "d(w_out)"], got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)
    assert torch.equal(got[3][1], torch.zeros_like(got[3][1])) and torch.equal(got[4][1], torch.zeros_like(got[4][1]))


def test_combine_tokens_under_bf16_autocast_sums_in_float32():
    experts = grouped()
    counts = torch.tensor([2, 2, 2, 2])
    token_S = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    x = torch.randn(4, 16, requires_grad=True)
    weight = torch.rand(8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts.combine_tokens(x, token_S, weight, counts)
    y.sum().backward()
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float32 and experts.w_in.grad.dtype == torch.float32
    torch.testing.assert_close(y, combine_reference(experts, x.detach(), token_S, weight.detach(), counts.tolist()),
                               rtol=0.05, atol=0.05)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("combine", [True, False])
def test_experts_keep_pre_activation_and_swiglu_or_only_pre_activation(combine, recompute):
    """Besides its inputs, the experts' forward keeps per slot the pre-activation [2F], silu(gate)
    and SwiGLU's output [F] (as the dense SwiGLU does), or with recompute only the pre-activation;
    never the gathered input rows. The gradients are the same either way."""
    counts, hidden = [3, 0, 5, 2], 8
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6 if combine else sum(counts), 16, generator=generator)
    token_S = torch.randint(0, 6, (sum(counts),), generator=generator)
    weight_S = torch.rand(sum(counts), generator=generator)
    grads = []
    for recompute_ in (recompute, not recompute):
        experts = grouped(hidden=hidden)
        experts.recompute = recompute_
        x_, weight_ = x.clone().requires_grad_(True), weight_S.clone().requires_grad_(True)
        inputs = {t.untyped_storage().data_ptr() for t in (x_, token_S, weight_, experts.w_in, experts.w_out)}
        kept = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in inputs:
                kept.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if combine:
                y = experts.combine_tokens(x_, token_S, weight_, torch.tensor(counts))
            else:
                y = experts(x_, torch.tensor(counts))
        per_expert = [[(m, 2 * hidden)] if recompute_ else [(m, 2 * hidden), (m, hidden), (m, hidden)] for m in counts]
        assert kept == [(shape, torch.float32) for shapes in per_expert for shape in shapes]
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        grads.append([x_.grad, weight_.grad if combine else None, experts.w_in.grad, experts.w_out.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("recompute", [False, True])
def test_a_retained_graph_gives_the_same_gradients_twice(recompute):
    """The backward updates only its own temporaries in place, never what the forward kept: a second
    backward through a retained graph adds exactly the same gradients again."""
    experts, counts = grouped(hidden=8), [3, 0, 5, 2]
    experts.recompute = recompute
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(6, 16, generator=generator, requires_grad=True)
    token_S = torch.randint(0, 6, (sum(counts),), generator=generator)
    weight_S = torch.rand(sum(counts), generator=generator, requires_grad=True)
    upstream = torch.randn(6, 16, generator=generator)
    y = experts.combine_tokens(x, token_S, weight_S, torch.tensor(counts))
    y.backward(upstream, retain_graph=True)
    first = [t.grad.clone() for t in (x, weight_S, experts.w_in, experts.w_out)]
    y.backward(upstream)
    for once, twice in zip(first, (x.grad, weight_S.grad, experts.w_in.grad, experts.w_out.grad)):
        torch.testing.assert_close(twice, 2 * once, rtol=0, atol=0)

"""Independent, deliberately naive references for the MoE layer, and small test helpers.

Everything here is written per token (or per expert) with Python loops and the textbook formulas,
sharing no code with `moe/` beyond reading the parameters of the module under test.

Shape legend: B sequences, T tokens, D model width, E experts, K experts per token, F expert hidden.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moe import MoEConfig, MoELayer, RouterConfig


def make_layer(
    *,
    dim: int = 16,
    num_experts: int = 8,
    hidden: int = 8,
    top_k: int = 2,
    score_func: str = "softmax",
    renormalize: bool = True,
    shared: int = 0,
    dropless: bool = True,
    seed: int = 0,
    std: float = 0.5,
    router: dict | None = None,
    **moe_kwargs,
) -> MoELayer:
    """A tiny MoE layer with weights large enough that routing decisions are well separated."""
    router_cfg = RouterConfig(top_k=top_k, score_func=score_func, renormalize=renormalize, **(router or {}))
    cfg = MoEConfig(
        num_experts=num_experts, expert_hidden=hidden, num_shared_experts=shared, router=router_cfg,
        dropless=dropless, **moe_kwargs,
    )
    torch.manual_seed(seed)
    layer = MoELayer(cfg, dim)
    # NOTE: MoELayer does not initialise its expert weights itself (see test_experts), so tests do.
    layer.reset_parameters(std=std, out_std=std)
    return layer


def silu(x: Tensor) -> Tensor:
    return x * (1.0 / (1.0 + torch.exp(-x)))


def expert_ref(x_D: Tensor, w_in_D2F: Tensor, w_out_FD: Tensor) -> Tensor:
    """One SwiGLU expert on one token: first F columns of w_in are the gate, the last F the up."""
    hidden = w_out_FD.shape[0]
    h_2F = x_D @ w_in_D2F
    return (silu(h_2F[:hidden]) * h_2F[hidden:]) @ w_out_FD


def shared_ref(layer: MoELayer, x_D: Tensor) -> Tensor:
    """The shared expert as a plain SwiGLU: nn.Linear stores weights as [out, in]."""
    w_in = layer.shared.w_in.weight.t()  # [D, 2F]
    w_out = layer.shared.w_out.weight.t()  # [F, D]
    return expert_ref(x_D, w_in, w_out)


def router_logits_ref(layer: MoELayer, x_D: Tensor) -> Tensor:
    """float32 router logits of one row, as the router promises (selective precision)."""
    weight_ED = layer.router.gate.weight.float()
    return torch.stack([torch.dot(weight_ED[e], x_D.float()) for e in range(weight_ED.shape[0])])


def scores_ref(logits_E: Tensor, score_func: str) -> Tensor:
    if score_func == "softmax":
        exp_E = torch.exp(logits_E - logits_E.max())
        return exp_E / exp_E.sum()
    return 1.0 / (1.0 + torch.exp(-logits_E))


def choose_ref(layer: MoELayer, x_D: Tensor) -> list[tuple[int, Tensor]]:
    """(expert, combine weight) pairs one row picks: top-K of score + bias, weights unbiased."""
    cfg = layer.config.router
    scores_E = scores_ref(router_logits_ref(layer, x_D), cfg.score_func.value)
    biased = (scores_E + layer.router.expert_bias.float()).tolist()
    chosen = sorted(range(len(biased)), key=lambda e: -biased[e])[: cfg.top_k]
    weights = [scores_E[e] for e in chosen]
    if cfg.renormalize:
        total = sum(weights)
        weights = [w / total for w in weights]
    return list(zip(chosen, weights))


def naive_moe(layer: MoELayer, x_BTD: Tensor) -> Tensor:
    """Dropless token-choice MoE, one token at a time."""
    batch, seq_len, dim = x_BTD.shape
    rows = []
    for x_D in x_BTD.reshape(-1, dim):
        out_D = torch.zeros_like(x_D)
        for e, w in choose_ref(layer, x_D):
            out_D = out_D + w.to(x_D.dtype) * expert_ref(x_D, layer.experts.w_in[e], layer.experts.w_out[e])
        if layer.shared is not None:
            out_D = out_D + shared_ref(layer, x_D)
        rows.append(out_D)
    return torch.stack(rows).view(batch, seq_len, dim)


def naive_sequence_moe(layer: MoELayer, x_BTD: Tensor) -> Tensor:
    """Sequence routing: the decision comes from each sequence's mean; every token follows it."""
    out = torch.zeros_like(x_BTD)
    for b in range(x_BTD.shape[0]):
        choice = choose_ref(layer, x_BTD[b].float().mean(dim=0))
        for t in range(x_BTD.shape[1]):
            x_D = x_BTD[b, t]
            for e, w in choice:
                out[b, t] += w.to(x_D.dtype) * expert_ref(x_D, layer.experts.w_in[e], layer.experts.w_out[e])
    return out


def naive_expert_choice(layer: MoELayer, x_BTD: Tensor, capacity: int) -> tuple[Tensor, int]:
    """Each expert takes the `capacity` tokens with the highest softmax score for it.

    Returns the output and the number of tokens no expert took."""
    batch, seq_len, dim = x_BTD.shape
    x_TD = x_BTD.reshape(-1, dim)
    scores = [scores_ref(router_logits_ref(layer, x_D), "softmax") for x_D in x_TD]
    out_rows = [torch.zeros_like(x_D) for x_D in x_TD]
    taken = set()
    for e in range(layer.config.num_experts):
        ranked = sorted(range(len(scores)), key=lambda t: -scores[t][e].item())[:capacity]
        for t in ranked:
            taken.add(t)
            y_D = expert_ref(x_TD[t], layer.experts.w_in[e], layer.experts.w_out[e])
            out_rows[t] = out_rows[t] + scores[t][e].to(x_TD.dtype) * y_D
    return torch.stack(out_rows).view(batch, seq_len, dim), len(x_TD) - len(taken)


def ceil_capacity(factor: float, tokens: int, top_k: int, experts: int) -> int:
    return max(1, math.ceil(factor * tokens * top_k / experts))


def grads(module: torch.nn.Module, x: Tensor, fn, upstream: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Output, input grad and every parameter grad of sum(fn(x) * upstream); unused params get 0."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y * upstream).sum().backward()
    param_grads = {
        name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for name, p in module.named_parameters()
    }
    module.zero_grad(set_to_none=True)
    return y.detach(), x.grad.detach(), param_grads


def expert_of_slot(counts_E: Tensor) -> Tensor:
    """For a plan's sorted slots S: which expert each slot belongs to."""
    return torch.repeat_interleave(torch.arange(counts_E.numel()), counts_E)


def plan_triples(plan) -> dict[int, set[tuple[int, float]]]:
    """{expert: {(token, weight), ...}} of a dispatch plan's kept assignments."""
    out: dict[int, set] = {e: set() for e in range(plan.counts_E.numel())}
    for e, t, w in zip(expert_of_slot(plan.counts_E).tolist(), plan.token_S.tolist(), plan.weight_S.tolist()):
        out[e].add((t, round(w, 6)))
    return out

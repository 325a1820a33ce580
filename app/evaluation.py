"""Held-out evaluation of a trained model: loss, perplexity, bits per byte, expert loads and what
each expert specialises in. Read-only: it never writes a checkpoint.

Shape legend: B windows, T tokens per window, V vocabulary, L MoE layers, E experts, S sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.text import Perplexity

from moe import Transformer


@dataclass
class EvalConfig:
    moe: str = ""  # a run name or checkpoint; empty: the run `make train CONFIG=...` makes
    dense: str = ""  # likewise; empty: the FLOP-matched dense baseline (trained first when missing)
    extra_sources: list[str] = field(default_factory=list)  # more text to score (files, folders, globs)
    max_windows: int = 0  # windows per source; 0: all of it
    batch_size: int = 16
    top_tokens: int = 8  # tokens listed per expert in the specialisation table

    def __post_init__(self) -> None:
        if self.max_windows < 0 or self.batch_size < 1 or self.top_tokens < 1:
            raise ValueError("eval.max_windows must be >= 0, eval.batch_size and eval.top_tokens >= 1")


@dataclass
class SourceScore:
    loss: float  # nats per token
    ppl: float  # torchmetrics Perplexity
    bits_per_byte: float
    tokens: int


@dataclass
class RoutingStats:
    """Routing on the evaluated text, at the eval capacity factor, summed over every source."""

    layer_ids: list[int]
    kept_LE: np.ndarray  # assignments computed per expert
    routed_LE: np.ndarray  # assignments chosen per expert (before capacity)
    dropped_L: np.ndarray
    assignments_L: np.ndarray
    token_counts_LEV: np.ndarray  # how often each vocabulary id was computed by each expert
    source_counts_LES: np.ndarray  # how many kept assignments of each source each expert computed

    @property
    def dropped_frac_L(self) -> np.ndarray:
        return self.dropped_L / np.maximum(self.assignments_L, 1)


@dataclass
class Evaluation:
    scores: dict[str, SourceScore] = field(default_factory=dict)
    routing: RoutingStats | None = None


@torch.no_grad()
def evaluate(
    model: Transformer, sources: dict[str, np.ndarray], token_bytes: Tensor, *, seq_len: int, batch_size: int,
    max_windows: int | None = None,
) -> Evaluation:
    """Score every source (flat token ids) in consecutive non-overlapping windows, in eval mode."""
    model.eval()
    tracker = _RoutingTracker(model, len(sources), model.config.vocab_size)
    result = Evaluation()
    for s, (name, ids) in enumerate(sources.items()):
        tracker.source = s
        result.scores[name] = _score(model, ids, token_bytes, seq_len, batch_size, max_windows, tracker)
    result.routing = tracker.finish()
    return result


def windows(ids: np.ndarray, seq_len: int, max_windows: int | None) -> np.ndarray:
    """(N, T+1) consecutive windows sharing one token at each boundary, as training validates."""
    count = (len(ids) - 1) // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    starts = np.arange(count) * seq_len
    return np.stack([ids[s : s + seq_len + 1] for s in starts]).astype(np.int64) if count else np.zeros((0, seq_len + 1), np.int64)


def _score(model, ids, token_bytes, seq_len, batch_size, max_windows, tracker) -> SourceScore:
    perplexity = Perplexity()
    nll_sum = nll_bytes = byte_sum = 0.0
    tokens = 0
    all_windows = windows(ids, seq_len, max_windows)
    for start in range(0, len(all_windows), batch_size):
        batch = torch.from_numpy(all_windows[start : start + batch_size])
        inputs_BT, targets_BT = batch[:, :-1], batch[:, 1:]
        tracker.inputs = inputs_BT.reshape(-1)
        logits_BTV, records = model(inputs_BT)
        tracker.add_records(records)
        perplexity.update(logits_BTV.float(), targets_BT)
        nll_T = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), reduction="none")
        bytes_T = token_bytes[targets_BT.flatten()]
        nll_sum += float(nll_T.sum())
        nll_bytes += float((nll_T * (bytes_T > 0)).sum())
        byte_sum += float(bytes_T.sum())
        tokens += nll_T.numel()
    if not tokens:  # shorter than one window: no score, not a perfect one
        return SourceScore(loss=math.nan, ppl=math.nan, bits_per_byte=math.nan, tokens=0)
    return SourceScore(loss=nll_sum / tokens, ppl=float(perplexity.compute()),
                       bits_per_byte=nll_bytes / max(byte_sum, 1.0) / math.log(2), tokens=tokens)


class _RoutingTracker:
    """Forward hooks on the routers: which token ids each expert computed, and from which source."""

    def __init__(self, model: Transformer, num_sources: int, vocab_size: int):
        self.layers = model.moe_layers()
        self.layer_ids = model.config.moe_layer_ids
        num_experts = self.layers[0].config.num_experts if self.layers else 0
        shape = (len(self.layers), num_experts)
        self.kept, self.routed = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
        self.dropped, self.assignments = np.zeros(len(self.layers), np.int64), np.zeros(len(self.layers), np.int64)
        self.tokens = np.zeros((*shape, vocab_size), np.int64)
        self.sources = np.zeros((*shape, num_sources), np.int64)
        self.source, self.inputs = 0, None
        self.handles = [layer.router.register_forward_hook(self._hook(j)) for j, layer in enumerate(self.layers)]

    def _hook(self, j: int):
        def hook(router, args, output) -> None:
            plan = output.plan
            expert_S = torch.repeat_interleave(torch.arange(plan.counts_E.numel()), plan.counts_E.cpu())
            token_ids_S = self.inputs[plan.token_S.cpu()]
            np.add.at(self.tokens[j], (expert_S.numpy(), token_ids_S.numpy()), 1)
            self.sources[j, :, self.source] += plan.counts_E.cpu().numpy()
        return hook

    def add_records(self, records) -> None:
        for j, r in enumerate(records):
            self.kept[j] += r.tokens_per_expert.cpu().numpy()
            self.routed[j] += r.routed_per_expert.cpu().numpy()
            self.dropped[j] += int(r.dropped)
            self.assignments[j] += int(r.assignments)

    def finish(self) -> RoutingStats | None:
        for handle in self.handles:
            handle.remove()
        if not self.layers:
            return None
        return RoutingStats(self.layer_ids, self.kept, self.routed, self.dropped, self.assignments, self.tokens, self.sources)


def top_tokens(stats: RoutingStats, decode, *, k: int = 8) -> dict[int, list[list[tuple[str, int]]]]:
    """For each MoE layer id: per expert, the k token strings it computed most often, with counts."""
    table = {}
    for j, layer in enumerate(stats.layer_ids):
        per_expert = []
        for counts_V in stats.token_counts_LEV[j]:
            best = np.argsort(-counts_V, kind="stable")[:k]
            per_expert.append([(decode(int(v)), int(counts_V[v])) for v in best if counts_V[v] > 0])
        table[layer] = per_expert
    return table

"""SwiGLU feed-forward networks: one dense, and E experts stored stacked.

Shape legend: T tokens, D model width, F hidden width (per expert), E experts, S tokens sorted by
expert (expert e owns one contiguous slice of `counts_E[e]` rows).

Gate and up projections are fused into one [D, 2F] matrix: one matrix product instead of two.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ExpertImpl(str, Enum):
    loop = "loop"  # one matmul per expert over its contiguous slice
    grouped_mm = "grouped_mm"  # torch.nn.functional.grouped_mm over all slices at once


def swiglu(h_T2F: Tensor) -> Tensor:
    """SwiGLU (Shazeer 2020): silu(gate) * up, with gate and up the two halves of the last dim."""
    gate_TF, up_TF = h_T2F.chunk(2, dim=-1)
    return F.silu(gate_TF) * up_TF


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: D -> 2F (gate, up) -> F -> D."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)
        self.reset_parameters(std=0.02, out_std=0.02)

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_in.weight, std=std)
        nn.init.normal_(self.w_out.weight, std=out_std)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.w_out(swiglu(self.w_in(x_TD)))


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights: w_in [E, D, 2F], w_out [E, F, D].

    forward(x_SD, counts_E) runs expert e on rows counts_E[:e].sum() .. counts_E[:e+1].sum().
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, impl: ExpertImpl = ExpertImpl.loop):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.impl = ExpertImpl(impl)
        if self.impl == ExpertImpl.grouped_mm and (dim % 8 or hidden % 8):
            # grouped_mm needs 16-byte aligned rows (8 bf16 values).
            raise ValueError(f"expert_impl=grouped_mm needs dim and expert_hidden divisible by 8, got {dim}, {hidden}")
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.reset_parameters(std=0.02, out_std=0.02)

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=out_std)

    def forward(self, x_SD: Tensor, counts_E: Tensor, grad_scale: float = 1.0) -> Tensor:
        """`grad_scale` multiplies the weights' gradient: under expert parallelism every ep rank's
        tokens contribute to it, and 1/ep turns that sum into the mean the other parameters get."""
        w_in, w_out = _local(self.w_in), _local(self.w_out)
        if grad_scale != 1.0:
            w_in, w_out = _ScaleGrad.apply(w_in, grad_scale), _ScaleGrad.apply(w_out, grad_scale)
        dtype = _compute_dtype(x_SD, w_in)
        # Cast the stacked weights once (not once per expert) when autocast would cast them.
        w_in, w_out, x_SD = w_in.to(dtype), w_out.to(dtype), x_SD.to(dtype)
        if self.impl == ExpertImpl.grouped_mm:
            return _grouped_mm_swiglu(x_SD, w_in, w_out, counts_E)
        return _loop_swiglu(x_SD, w_in, w_out, counts_E)


def _local(w: Tensor) -> Tensor:
    """This rank's shard of an expert weight (a DTensor under expert parallelism)."""
    return w.to_local() if hasattr(w, "to_local") else w


def _compute_dtype(x: Tensor, w: Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return w.dtype


def _loop_swiglu(x_SD: Tensor, w_in: Tensor, w_out: Tensor, counts_E: Tensor) -> Tensor:
    # NOTE: unbind once per forward; indexing w[e] per expert would make every expert's backward
    # allocate a gradient the size of the whole stacked weight.
    sizes = counts_E.tolist()
    outs = [
        swiglu(x_sD @ w_in_D2F) @ w_out_FD
        for x_sD, w_in_D2F, w_out_FD in zip(x_SD.split(sizes), w_in.unbind(0), w_out.unbind(0))
    ]
    return torch.cat(outs) if outs else x_SD.new_zeros(0, w_out.shape[-1])


def _grouped_mm_swiglu(x_SD: Tensor, w_in: Tensor, w_out: Tensor, counts_E: Tensor) -> Tensor:
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    h_S2F = _ContiguousGrad.apply(F.grouped_mm(x_SD, w_in, offs=offsets_E))
    return _ContiguousGrad.apply(F.grouped_mm(swiglu(h_S2F), w_out, offs=offsets_E))


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    grouped_mm's backward fails on stride-0 gradients (e.g. from `.sum()`).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()

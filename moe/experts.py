"""SwiGLU feed-forward networks: one dense, and E experts stored stacked.

Shape legend: T tokens, D model width, F hidden width (per expert), E experts, S slots sorted by
expert (expert e owns one contiguous slice of `counts_E[e]` rows), m the rows of one expert.

Gate and up projections are fused into one [D, 2F] matrix: one matrix product instead of two.

The experts' forward and backward are written by hand (`_Experts`), because on CPUs profiles
showed these costs besides the matrix products (see README, Performance):
- concatenations: per-expert outputs and gradients, and `chunk`'s backward joining d(gate) and
  d(up). Here every expert writes its slice of one buffer, and SwiGLU's backward fills the two
  halves of one gradient buffer.
- page faults: glibc maps every fresh buffer of 32 MB or more anew, and first touching it costs
  about 0.4 ms per MB (as much as a matrix product over it). `loop` works expert by expert, so an
  expert's activations are small, hot in cache, and their memory is recycled.
- [T*K, D] copies: `combine_tokens` gathers each expert's tokens, runs it and scatter-adds its
  weighted output, expert by expert, never materialising all T*K rows at once.
"""

from __future__ import annotations

import itertools
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class ExpertImpl(str, Enum):
    loop = "loop"  # expert by expert: one matmul per expert over its rows
    grouped_mm = "grouped_mm"  # torch.nn.functional.grouped_mm over all experts' rows at once


def swiglu(h_T2F: Tensor) -> Tensor:
    """SwiGLU (Shazeer 2020): silu(gate) * up, with gate and up the two halves of the last dim."""
    return _SwiGLU.apply(h_T2F)


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
        w_in, w_out = self._weights(x_SD, grad_scale)
        return _Experts.apply(x_SD, None, w_in, w_out, None, counts_E, self.impl)

    def combine_tokens(self, x_TD: Tensor, token_S: Tensor, weight_S: Tensor, counts_E: Tensor) -> Tensor:
        """out_t = sum over the slots s of token t of weight_S[s] * expert(s)(x_t), slots sorted by
        expert: gather, experts and combine in one. Sums in float32 (or wider)."""
        w_in, w_out = self._weights(x_TD, 1.0)
        return _Experts.apply(x_TD, weight_S, w_in, w_out, token_S, counts_E, self.impl)

    def _weights(self, x: Tensor, grad_scale: float) -> tuple[Tensor, Tensor]:
        """This rank's weights, with the gradient scale, in the compute dtype: the stacked weights
        are cast once per forward, not once per expert."""
        w_in, w_out = local_shard(self.w_in), local_shard(self.w_out)
        if grad_scale != 1.0:
            w_in, w_out = _ScaleGrad.apply(w_in, grad_scale), _ScaleGrad.apply(w_out, grad_scale)
        dtype = _compute_dtype(x, w_in)
        return w_in.to(dtype), w_out.to(dtype)


def local_shard(t: Tensor) -> Tensor:
    """This rank's shard of a tensor that may be a DTensor (expert weights under expert parallelism,
    any parameter under FSDP); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _compute_dtype(x: Tensor, w: Tensor) -> torch.dtype:
    """The dtype the experts' products run in: autocast's when it is on, else the weights'."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return w.dtype


class _Experts(torch.autograd.Function):
    """The experts on their slots, expert by expert (`loop`) or all at once (`grouped_mm`).

    With `token_S` (combine mode), x is x_TD: each expert gathers its tokens' rows, and its output,
    scaled by `weight_S`, is scatter-added into out [T, D]. Without it, x is x_SD, already in slot
    order, and the output is y_SD. The weights arrive in the compute dtype; x is cast here (T rows
    rather than T*K), and combine mode sums out and d(x) in float32 (or wider).

    NOTE: gathering, running and scatter-adding one expert at a time keeps its rows hot in cache
    from one step to the next; measured on 2 cores, that beats gathering many experts' rows at
    once (fewer, larger operations) by 10 to 20% at 64 experts.
    """

    @staticmethod
    def forward(ctx, x, weight_S, w_in_ED2F, w_out_EFD, token_S, counts_E, impl: ExpertImpl) -> Tensor:
        plan, combined = _Plan(counts_E, impl), token_S is not None
        xc = x.to(w_in_ED2F.dtype)
        acc_dtype = _acc_dtype(x.dtype, weight_S) if combined else xc.dtype
        new = xc.new_zeros if combined else xc.new_empty  # tokens get sums; slots are all written
        out = new(x.shape[0], w_out_EFD.shape[-1], dtype=acc_dtype)
        saved = []
        with torch.autocast(x.device.type, enabled=False):  # nothing to cast; `out=` products refuse autocast
            for e, rows in plan.parts:
                x_mD = xc.index_select(0, token_S[rows]) if combined else xc[rows]
                group = plan.group(e, w_in_ED2F, w_out_EFD, None if weight_S is None else weight_S[rows])
                y_mD = group.forward(x_mD, None if combined else out[rows])
                if combined:
                    out.index_add_(0, token_S[rows], y_mD.to(acc_dtype))
                saved += [x_mD, *group.saved()]
        ctx.plan, ctx.x_dtype = plan, x.dtype
        ctx.save_for_backward(weight_S, w_in_ED2F, w_out_EFD, token_S, *saved)
        return out.to(torch.promote_types(x.dtype, weight_S.dtype)) if combined else out

    @staticmethod
    @once_differentiable  # writes into buffers with `out=`: no graph of the backward
    def backward(ctx, dout: Tensor):
        weight_S, w_in_ED2F, w_out_EFD, token_S, *saved = ctx.saved_tensors
        plan, combined = ctx.plan, token_S is not None
        dout = dout.contiguous()  # e.g. stride 0 from `.sum()`: grouped_mm refuses those
        acc_dtype = _acc_dtype(ctx.x_dtype, weight_S) if combined else w_in_ED2F.dtype
        dx = dout.new_zeros(dout.shape[0], w_in_ED2F.shape[-2], dtype=acc_dtype)
        dweight_S = None if weight_S is None else torch.empty_like(weight_S)
        dw_in, dw_out = (torch.empty_like(w_in_ED2F), torch.empty_like(w_out_EFD)) if plan.loop else (None, None)
        with torch.autocast(dout.device.type, enabled=False):
            for i, (e, rows) in enumerate(plan.parts):
                group = plan.group(e, w_in_ED2F, w_out_EFD, None if weight_S is None else weight_S[rows])
                x_mD = group.restore(saved[5 * i : 5 * i + 5])
                dout_mD = dout.index_select(0, token_S[rows]) if combined else dout[rows]
                dx_mD, dweight_m = group.backward(dout_mD, x_mD, None if combined else dx[rows],
                                                  *plan.grad_slots(dw_in, dw_out, e))
                if combined:
                    dx.index_add_(0, token_S[rows], dx_mD.to(acc_dtype))
                if dweight_S is not None:
                    dweight_S[rows] = dweight_m
        if not plan.loop:  # grouped_mm: its one group computed the whole weight gradients
            dw_in, dw_out = group.dw_in, group.dw_out
        return dx.to(ctx.x_dtype), dweight_S, dw_in, dw_out, None, None, None


def _acc_dtype(x_dtype: torch.dtype, weight_S: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x_dtype, weight_S.dtype), torch.float32)


class _Plan:
    """The parts the slots split into, each with its products: one expert's rows (`loop`; experts
    without rows too, so that their weight gradient is written, zero), or every slot (`grouped_mm`)."""

    def __init__(self, counts_E: Tensor, impl: ExpertImpl):
        self.loop = impl == ExpertImpl.loop
        if self.loop:
            ends = itertools.accumulate(counts_E.tolist())
            self.parts = [(e, slice(end - size, end)) for e, (size, end) in enumerate(zip(counts_E.tolist(), ends))]
        else:  # no host sync: grouped_mm reads the sizes from the offsets
            self.offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
            self.parts = [(None, slice(None))]

    def group(self, e: int | None, w_in_ED2F: Tensor, w_out_EFD: Tensor, weight_m: Tensor | None) -> _Group:
        weight_m1 = None if weight_m is None else weight_m.unsqueeze(-1)
        if e is None:
            return _Group(_GroupedMM(self.offsets_E), w_in_ED2F, w_out_EFD, weight_m1)
        return _Group(_MM, w_in_ED2F[e], w_out_EFD[e], weight_m1)

    @staticmethod
    def grad_slots(dw_in: Tensor | None, dw_out: Tensor | None, e: int | None) -> tuple[Tensor | None, Tensor | None]:
        """Where expert e's weight gradients go (grouped_mm's are made whole, so nowhere)."""
        return (None, None) if e is None else (dw_in[e], dw_out[e])


class _MM:
    """Products of one expert's rows with its 2-D weights; `out` is written when given."""

    @staticmethod
    def mm(a_mX: Tensor, w_XY: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.mm(a_mX, w_XY) if out is None else torch.mm(a_mX, w_XY, out=out)

    @staticmethod
    def mm_t(a_mY: Tensor, w_XY: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.mm(a_mY, w_XY.t()) if out is None else torch.mm(a_mY, w_XY.t(), out=out)

    @staticmethod
    def weight_grad(a_mX: Tensor, b_mY: Tensor, out: Tensor | None = None) -> Tensor:
        """a^T @ b: exactly zero for an expert without rows."""
        return torch.mm(a_mX.t(), b_mY) if out is None else torch.mm(a_mX.t(), b_mY, out=out)


class _GroupedMM:
    """The same products over all experts' rows at once (3-D weights), grouped by offsets."""

    def __init__(self, offsets_E: Tensor):
        self.offsets_E = offsets_E

    def mm(self, a_SX: Tensor, w_EXY: Tensor, out: Tensor | None = None) -> Tensor:
        return _into(F.grouped_mm(a_SX, w_EXY, offs=self.offsets_E), out)

    def mm_t(self, a_SY: Tensor, w_EXY: Tensor, out: Tensor | None = None) -> Tensor:
        return _into(F.grouped_mm(a_SY, w_EXY.transpose(-2, -1), offs=self.offsets_E), out)

    def weight_grad(self, a_SX: Tensor, b_SY: Tensor, out: None = None) -> Tensor:
        return F.grouped_mm(a_SX.t(), b_SY, offs=self.offsets_E)


def _into(t: Tensor, out: Tensor | None) -> Tensor:
    return t if out is None else out.copy_(t)


class _Group:
    """SwiGLU experts on a group of m rows (one expert's, or all experts' for grouped_mm), the
    output optionally scaled by per-row combine weights.

    The weight multiplies the narrower of the activation [m, F] and the output [m, D]:
    fine-grained experts (F < D) scale their activation, which also turns
    d(weight) = <d(out), y> into <d(out) @ w_out^T, a>, a sum over F instead of D.
    """

    def __init__(self, products, w_in: Tensor, w_out: Tensor, weight_m1: Tensor | None):
        self.products, self.w_in, self.w_out, self.weight_m1 = products, w_in, w_out, weight_m1
        self.at_activation = weight_m1 is not None and w_out.shape[-2] < w_out.shape[-1]

    def forward(self, x_mD: Tensor, out_mD: Tensor | None) -> Tensor:
        mm = self.products.mm
        self.h_m2F = mm(x_mD, self.w_in)
        self.a_mF, self.s_mF = _swiglu_forward(self.h_m2F)
        if self.weight_m1 is None:
            self.z = self.a_mF.new_empty(0)
            return mm(self.a_mF, self.w_out, out_mD)
        if self.at_activation:
            self.z = (self.a_mF * self.weight_m1).to(self.a_mF.dtype)  # the weighted activation
            return mm(self.z, self.w_out, out_mD)
        self.z = mm(self.a_mF, self.w_out)  # the unweighted output: d(weight) needs it
        if out_mD is None:
            return (self.z * self.weight_m1).to(self.z.dtype)
        return torch.mul(self.z, self.weight_m1, out=out_mD)

    def saved(self) -> list[Tensor]:
        """What backward needs besides the input rows."""
        return [self.h_m2F, self.s_mF, self.a_mF, self.z]

    def restore(self, saved: list[Tensor]) -> Tensor:
        """Takes [input rows, *saved()]; returns the input rows."""
        x_mD, self.h_m2F, self.s_mF, self.a_mF, self.z = saved
        return x_mD

    def backward(self, dout_mD: Tensor, x_mD: Tensor, dx_mD: Tensor | None, dw_in: Tensor | None,
                 dw_out: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(d(x), d(weight) or None); the weight gradients go to self.dw_in and self.dw_out."""
        p, a_mF, dtype = self.products, self.a_mF, self.a_mF.dtype
        dweight_m = None
        if self.at_activation:
            dout_mD = dout_mD.to(dtype)
            self.dw_out = p.weight_grad(self.z, dout_mD, dw_out)
            u_mF = p.mm_t(dout_mD, self.w_out)
            dweight_m = (u_mF * a_mF).sum(dim=-1)
            da_mF = (u_mF * self.weight_m1).to(dtype)
        else:
            if self.weight_m1 is not None:
                dweight_m = (dout_mD * self.z).sum(dim=-1)
                dout_mD = dout_mD * self.weight_m1
            dy_mD = dout_mD.to(dtype)
            self.dw_out = p.weight_grad(a_mF, dy_mD, dw_out)
            da_mF = p.mm_t(dy_mD, self.w_out)
        dh_m2F = _swiglu_backward(da_mF, self.h_m2F, self.s_mF)
        self.dw_in = p.weight_grad(x_mD, dh_m2F, dw_in)
        return p.mm_t(dh_m2F, self.w_in, dx_mD), dweight_m


# ---------------------------------------------------------------------------------------------
# SwiGLU


class _SwiGLU(torch.autograd.Function):
    """SwiGLU whose backward writes d(gate) and d(up) into the halves of one [T, 2F] buffer."""

    @staticmethod
    def forward(ctx, h_T2F: Tensor) -> Tensor:
        a_TF, s_TF = _swiglu_forward(h_T2F)
        ctx.save_for_backward(h_T2F, s_TF)
        return a_TF

    @staticmethod
    @once_differentiable
    def backward(ctx, da_TF: Tensor) -> Tensor:
        h_T2F, s_TF = ctx.saved_tensors
        return _swiglu_backward(da_TF, h_T2F, s_TF)


def _swiglu_forward(h_T2F: Tensor) -> tuple[Tensor, Tensor]:
    """(silu(gate) * up, silu(gate)): the second is kept for the backward, one pass fewer there."""
    gate_TF, up_TF = h_T2F.chunk(2, dim=-1)
    s_TF = F.silu(gate_TF)
    return s_TF * up_TF, s_TF


def _swiglu_backward(da_TF: Tensor, h_T2F: Tensor, s_TF: Tensor) -> Tensor:
    """d/dh of silu(gate) * up = [silu'(gate) * da * up, silu(gate) * da], written into the two
    halves of one buffer (no concatenation)."""
    gate_TF, up_TF = h_T2F.chunk(2, dim=-1)
    dh_T2F = torch.empty_like(h_T2F, memory_format=torch.contiguous_format)
    dgate_TF, dup_TF = dh_T2F.chunk(2, dim=-1)
    torch.mul(da_TF, s_TF, out=dup_TF)
    torch.ops.aten.silu_backward.grad_input(da_TF * up_TF, gate_TF, grad_input=dgate_TF)
    return dh_T2F


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None

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
  weighted output, expert by expert, never materialising all T*K rows at once. Its gathers and
  products write into one buffer reused by every expert (`_Workspace`).
- activation memory: each expert keeps for the backward what the dense SwiGLU keeps (h, silu(gate)
  and SwiGLU's output), not its gathered input rows, which the backward gathers again; with
  `recompute`, only h (half of it; see README, Performance).
"""

from __future__ import annotations

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

    def __init__(self, num_experts: int, dim: int, hidden: int, impl: ExpertImpl = ExpertImpl.loop,
                 recompute: bool = False):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.impl = ExpertImpl(impl)
        self.recompute = recompute  # keep only h for the backward, recompute silu and SwiGLU there
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
        return _Experts.apply(x_SD, None, w_in, w_out, None, counts_E, self.impl, self.recompute)

    def combine_tokens(self, x_TD: Tensor, token_S: Tensor, weight_S: Tensor, counts_E: Tensor) -> Tensor:
        """out_t = sum over the slots s of token t of weight_S[s] * expert(s)(x_t), slots sorted by
        expert: gather, experts and combine in one. Sums in float32 (or wider)."""
        w_in, w_out = self._weights(x_TD, 1.0)
        return _Experts.apply(x_TD, weight_S, w_in, w_out, token_S, counts_E, self.impl, self.recompute)

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

    Each expert keeps its pre-activation h [m, 2F], silu(gate) and SwiGLU's output a [m, F] for the
    backward, as the dense SwiGLU does; with `recompute`, only h, and the backward recomputes the
    other two (two elementwise passes per expert). The gathered [T*K, D] input rows are never kept:
    the backward gathers them again.

    NOTE: gathering, running and scatter-adding one expert at a time keeps its rows hot in cache
    from one step to the next; measured on 2 cores, that beats gathering many experts' rows at
    once (fewer, larger operations) by 10 to 20% at 64 experts.
    """

    @staticmethod
    def forward(ctx, x, weight_S, w_in_ED2F, w_out_EFD, token_S, counts_E, impl: ExpertImpl, recompute: bool) -> Tensor:
        plan, combined = _Plan(counts_E, impl), token_S is not None
        xc = x.to(w_in_ED2F.dtype)
        acc_dtype = _acc_dtype(x.dtype, weight_S) if combined else xc.dtype
        new = xc.new_zeros if combined else xc.new_empty  # tokens get sums; slots are all written
        out = new(x.shape[0], w_out_EFD.shape[-1], dtype=acc_dtype)
        space = _Workspace(plan, xc, acc_dtype)
        saved = []
        with torch.autocast(x.device.type, enabled=False):  # nothing to cast; `out=` products refuse autocast
            for x_mD, token_m, weight_m, w_in, w_out, out_mD in zip(
                plan.rows(None if combined else xc), plan.rows(token_S), plan.rows(weight_S),
                plan.experts(w_in_ED2F), plan.experts(w_out_EFD), plan.rows(None if combined else out),
            ):
                if combined:
                    x_mD = torch.index_select(xc, 0, token_m, out=space.x(token_m))
                y_mD, kept = _Group(plan.products, w_in, w_out, weight_m).forward(
                    x_mD, space.y(token_m) if combined else out_mD, recompute)
                if combined:
                    out.index_add_(0, token_m, space.acc(y_mD))
                saved += kept
        ctx.plan, ctx.x_dtype, ctx.kept = plan, x.dtype, 1 if recompute else 3
        ctx.save_for_backward(xc, weight_S, w_in_ED2F, w_out_EFD, token_S, *saved)
        return out.to(torch.promote_types(x.dtype, weight_S.dtype)) if combined else out

    @staticmethod
    @once_differentiable  # writes into buffers with `out=`: no graph of the backward
    def backward(ctx, dout: Tensor):
        xc, weight_S, w_in_ED2F, w_out_EFD, token_S, *saved = ctx.saved_tensors
        plan, combined, n = ctx.plan, token_S is not None, ctx.kept
        dout = dout.contiguous()  # e.g. stride 0 from `.sum()`: grouped_mm refuses those
        acc_dtype = _acc_dtype(ctx.x_dtype, weight_S) if combined else xc.dtype
        dx = dout.new_zeros(dout.shape[0], xc.shape[-1], dtype=acc_dtype)
        dweight_S = None if weight_S is None else torch.empty_like(weight_S)
        dw_in, dw_out = (torch.empty_like(w_in_ED2F), torch.empty_like(w_out_EFD)) if plan.loop else (None, None)
        space = _Workspace(plan, xc, acc_dtype, dout)
        with torch.autocast(dout.device.type, enabled=False):
            for kept, x_mD, dout_mD, token_m, weight_m, dweight_m, w_in, w_out, dw_in_e, dw_out_e, dx_mD in zip(
                [saved[i : i + n] for i in range(0, len(saved), n)],
                plan.rows(None if combined else xc), plan.rows(None if combined else dout),
                plan.rows(token_S), plan.rows(weight_S), plan.rows(dweight_S),
                plan.experts(w_in_ED2F), plan.experts(w_out_EFD), plan.experts(dw_in), plan.experts(dw_out),
                plan.rows(None if combined else dx),
            ):
                if combined:
                    x_mD = torch.index_select(xc, 0, token_m, out=space.x(token_m))
                    dout_mD = torch.index_select(dout, 0, token_m, out=space.y(token_m))
                    dx_mD = x_mD  # d(x) overwrites the gathered rows, once d(w_in) has used them
                group = _Group(plan.products, w_in, w_out, weight_m)
                dx_mD = group.backward(dout_mD, x_mD, kept, dx_mD, dw_in_e, dw_out_e, dweight_m)
                if combined:
                    dx.index_add_(0, token_m, space.acc(dx_mD))
        if not plan.loop:  # grouped_mm: its one group computed the whole weight gradients
            dw_in, dw_out = group.dw_in, group.dw_out
        return dx.to(ctx.x_dtype), dweight_S, dw_in, dw_out, None, None, None, None


def _acc_dtype(x_dtype: torch.dtype, weight_S: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x_dtype, weight_S.dtype), torch.float32)


class _Plan:
    """The parts the slots split into: one per expert (`loop`; experts without rows too, so that
    their weight gradient is written, zero), or one of every slot (`grouped_mm`). Each part's views
    of a tensor are made in one call (`split`, `unbind`), not one indexing per expert."""

    def __init__(self, counts_E: Tensor, impl: ExpertImpl):
        self.loop = impl == ExpertImpl.loop
        if self.loop:
            self.sizes = counts_E.tolist()
            self.products = _MM
        else:  # no host sync: grouped_mm reads the sizes from the offsets
            self.sizes = None
            self.products = _GroupedMM(torch.cumsum(counts_E, 0, dtype=torch.int32))
        self.num_parts = len(self.sizes) if self.loop else 1

    def rows(self, t_S: Tensor | None) -> list[Tensor] | list[None]:
        """Each part's rows of a tensor in slot order (Nones for None)."""
        if t_S is None:
            return [None] * self.num_parts
        return list(t_S.split(self.sizes)) if self.loop else [t_S]

    def experts(self, w_E: Tensor | None) -> list[Tensor] | list[None]:
        """Each part's expert weights: one expert's (`loop`), or all of them (Nones for None)."""
        if w_E is None:
            return [None] * self.num_parts
        return list(w_E.unbind(0)) if self.loop else [w_E]

    def max_rows(self) -> int | None:
        return max(self.sizes, default=0) if self.loop else None


class _Workspace:
    """Buffers for the largest part's rows, reused by every part: gathered rows and products land
    in memory that is already mapped and hot in cache, where a fresh tensor per expert costs page
    faults whenever the allocator has handed memory back to the system. `grouped_mm`'s one part
    has no size without a host sync: it gets fresh tensors (None)."""

    def __init__(self, plan: _Plan, xc: Tensor, acc_dtype: torch.dtype, dout: Tensor | None = None):
        rows, dim = plan.max_rows(), xc.shape[-1]
        self.acc_dtype = acc_dtype
        self._x = None if rows is None else xc.new_empty(rows, dim)
        self._y = None if rows is None else (xc if dout is None else dout).new_empty(rows, dim)
        self._acc = None if rows is None or acc_dtype == xc.dtype else xc.new_empty(rows, dim, dtype=acc_dtype)

    def x(self, token_m: Tensor) -> Tensor | None:
        return None if self._x is None else self._x[: len(token_m)]

    def y(self, token_m: Tensor) -> Tensor | None:
        return None if self._y is None else self._y[: len(token_m)]

    def acc(self, t_mD: Tensor) -> Tensor:
        """t in the accumulation dtype (copied into a buffer when it differs)."""
        if t_mD.dtype == self.acc_dtype:
            return t_mD
        return t_mD.to(self.acc_dtype) if self._acc is None else self._acc[: len(t_mD)].copy_(t_mD)


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

    The weight multiplies the narrower of the activation [m, F] and the output [m, D]: fine-grained
    experts (F < D) scale their activation. Either way d(weight) = <d(out) @ w_out^T, a>, a sum over
    F, so the unweighted output never has to be kept.
    """

    def __init__(self, products, w_in: Tensor, w_out: Tensor, weight_m: Tensor | None):
        self.products, self.w_in, self.w_out = products, w_in, w_out
        self.weight_m1 = None if weight_m is None else weight_m.unsqueeze(-1)
        self.at_activation = weight_m is not None and w_out.shape[-2] < w_out.shape[-1]

    def forward(self, x_mD: Tensor, out_mD: Tensor | None, recompute: bool) -> tuple[Tensor, list[Tensor]]:
        """(the output, written into out_mD when given; what the backward needs: [h, a, silu(gate)],
        or [h] to recompute the other two)."""
        mm, w = self.products.mm, self.weight_m1
        h_m2F = mm(x_mD, self.w_in)
        a_mF, s_mF = _swiglu_forward(h_m2F)
        kept = [h_m2F] if recompute else [h_m2F, a_mF, s_mF]
        z_mF = a_mF
        if self.at_activation:  # a is updated in place when it is not kept
            z_mF = a_mF.mul_(w) if recompute else (a_mF * w).to(a_mF.dtype)
        y_mD = mm(z_mF, self.w_out, out_mD)
        if w is not None and not self.at_activation:
            y_mD.mul_(w)
        return y_mD, kept

    def backward(self, dout_mD: Tensor, x_mD: Tensor, kept: list[Tensor], dx_mD: Tensor | None, dw_in: Tensor | None,
                 dw_out: Tensor | None, dweight_m: Tensor | None) -> Tensor:
        """d(x), written into dx_mD when given. The weight gradients are written into dw_in and
        dw_out when given (else kept as self.dw_in, self.dw_out), d(weight) into dweight_m.
        Fresh temporaries are updated in place once read (fewer buffers keep the working set in
        cache); what forward kept is only read."""
        p, w = self.products, self.weight_m1
        h_m2F, *activations = kept
        a_mF, s_mF = activations or _swiglu_forward(h_m2F)  # with recompute, made again here
        dout_mD = dout_mD.to(a_mF.dtype)
        da_mF = p.mm_t(dout_mD, self.w_out)  # d(out) @ w_out^T: d(a) before the weight
        if w is not None:
            dweight_m.copy_((da_mF * a_mF).sum(dim=-1))
            da_mF.mul_(w)
            if self.at_activation:
                a_mF = a_mF.mul_(w) if not activations else (a_mF * w).to(a_mF.dtype)
            else:
                dout_mD = (dout_mD * w).to(dout_mD.dtype)
        self.dw_out = p.weight_grad(a_mF, dout_mD, dw_out)
        dh_m2F = _swiglu_backward(da_mF, h_m2F, s_mF)
        self.dw_in = p.weight_grad(x_mD, dh_m2F, dw_in)
        return p.mm_t(dh_m2F, self.w_in, dx_mD)


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
    torch.mul(da_TF, up_TF, out=dgate_TF)  # da * up, then silu' in place: no temporary
    torch.ops.aten.silu_backward.grad_input(dgate_TF, gate_TF, grad_input=dgate_TF)
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

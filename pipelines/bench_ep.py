"""The ep=2 row of `make bench parallel.enabled=true`: the MoE layer under expert parallelism.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m pipelines.bench_ep \
        '{"tokens": 4096, "dim": 512, "hidden": 1024, "experts": 8, "top_k": 2, "dtype": "fp32", "repeats": 5, "warmup": 2}'

Every rank takes tokens/world of the global batch, its experts are sharded over the ep group
(moe.parallel.parallelize_experts), and each all-to-all (the token and gradient exchanges and the
routing metadata) is timed from its call to its return, waiting for the slower rank included.
Prints one JSON line from rank 0: the median step time (the slowest rank's) and the all-to-all share.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh

import moe.parallel
from moe import MoEConfig, MoELayer, RouterConfig
from moe.parallel import parallelize_experts

_spent = [0.0]  # seconds inside all-to-all calls since the last reset
_all_to_all_single = dist.all_to_all_single


def _timed_all_to_all_single(*args, **kwargs):
    start = time.perf_counter()
    try:
        return _all_to_all_single(*args, **kwargs)
    finally:
        _spent[0] += time.perf_counter() - start


class _TimedAllToAll(torch.autograd.Function):
    """all_to_all_single_autograd's contract (uneven splits, gradient sent back), each direction timed."""

    @staticmethod
    def forward(ctx, x: Tensor, output_split_sizes: list[int], input_split_sizes: list[int], group) -> Tensor:
        ctx.splits = (input_split_sizes, output_split_sizes, group)
        return _exchange(x, output_split_sizes, input_split_sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        input_split_sizes, output_split_sizes, group = ctx.splits
        return _exchange(grad, input_split_sizes, output_split_sizes, group), None, None, None


def _exchange(x: Tensor, recv: list[int], send: list[int], group) -> Tensor:
    out = x.new_empty(sum(recv), *x.shape[1:])
    _timed_all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class _Layers(nn.Module):
    """parallelize_experts walks `moe_layers()`."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer

    def moe_layers(self) -> list[MoELayer]:
        return [self.layer]


def measure(args: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # every rank builds the same weights
    config = MoEConfig(num_experts=args["experts"], expert_hidden=args["hidden"],
                       router=RouterConfig(top_k=args["top_k"]), dropless=True)
    layer = MoELayer(config, args["dim"])
    parallelize_experts(_Layers(layer), init_device_mesh("cpu", (world,)))
    local = args["tokens"] // world
    x_global, grad_global = torch.randn(1, args["tokens"], args["dim"]), torch.randn(1, args["tokens"], args["dim"])
    x, grad = x_global[:, rank * local:(rank + 1) * local], grad_global[:, rank * local:(rank + 1) * local]
    autocast = args["dtype"] == "bf16"
    steps, shares, spent = [], [], []
    for i in range(args["warmup"] + args["repeats"]):
        layer.zero_grad(set_to_none=True)
        dist.barrier()
        _spent[0] = 0.0
        start = time.perf_counter()
        x_ = x.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, record = layer(x_)
        y.backward(grad.to(y.dtype))
        elapsed = time.perf_counter() - start
        slowest = torch.tensor([elapsed])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if i >= args["warmup"]:
            steps.append(float(slowest))
            shares.append(_spent[0] / elapsed)
            spent.append(_spent[0])
    share = torch.tensor([statistics.median(shares), statistics.median(spent)])
    dist.all_reduce(share)
    return {"ms_median": 1e3 * statistics.median(steps), "alltoall_share": float(share[0]) / world,
            "alltoall_ms": 1e3 * float(share[1]) / world, "world": world}


def main() -> None:
    args = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    # Time every all-to-all the layer makes: the autograd one for tokens, the plain one for metadata.
    moe.parallel.all_to_all_single_autograd = _TimedAllToAll.apply
    moe.parallel.dist.all_to_all_single = _timed_all_to_all_single
    result = measure(args)
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    dist.barrier()  # nobody tears the group down while a peer still talks to it (gloo aborts)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

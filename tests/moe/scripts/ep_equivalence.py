"""Run under torchrun with 2 processes: the MoE layer with ep=2 against one process with ep=1.

Prints one JSON line (from rank 0): the largest differences of outputs and gradients per case.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moe import MoEConfig, MoELayer, RouterConfig
from moe.parallel import parallelize_experts

CASES = [
    dict(top_k=1, dropless=True, policy="probs"),
    dict(top_k=2, dropless=True, policy="probs"),
    dict(top_k=1, dropless=False, policy="probs"),
    dict(top_k=2, dropless=False, policy="probs"),
    dict(top_k=2, dropless=False, policy="position"),
]


def layer_for(case: dict) -> MoELayer:
    torch.manual_seed(0)
    config = MoEConfig(
        num_experts=4, expert_hidden=16, num_shared_experts=1, router=RouterConfig(top_k=case["top_k"]),
        dropless=case["dropless"], capacity_factor=0.75, drop_policy=case["policy"],
    )
    layer = MoELayer(config, dim=8)
    layer.reset_parameters(std=0.5, out_std=0.5)  # large weights: uneven routing, real drops
    return layer


def run(case: dict, rank: int, world: int) -> dict:
    torch.manual_seed(1)
    x_global = torch.randn(2 * world, 6, 8)  # (B, T, D); rank r takes sequences [2r, 2r+2)
    g_global = torch.randn(2 * world, 6, 8)
    reference = layer_for(case)
    x_ref = x_global.clone().requires_grad_(True)
    y_ref, rec_ref = reference(x_ref)
    ((y_ref * g_global).sum() + rec_ref.aux_loss * world).backward()

    layer = layer_for(case)
    parallelize_experts(layer_container(layer), init_device_mesh("cpu", (world,)))
    x = x_global[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
    y, record = layer(x)
    ((y * g_global[2 * rank : 2 * rank + 2]).sum() + record.aux_loss).backward()

    ys = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(ys, y.detach())
    xg = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(xg, x.grad)
    errors = {"y": (torch.cat(ys) - y_ref).abs().max().item(), "x_grad": (torch.cat(xg) - x_ref.grad).abs().max().item()}
    for name, p in layer.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
        if not hasattr(p.grad, "full_tensor"):
            dist.all_reduce(grad)  # replicated parameters: each rank holds its tokens' share
            grad = grad / world  # data-parallel mean
        ref = dict(reference.named_parameters())[name].grad / world
        errors[name] = (grad - ref).abs().max().item()
    kept = record.tokens_per_expert.clone()
    dist.all_reduce(kept)
    dropped = record.dropped.clone()
    dist.all_reduce(dropped)
    errors["kept_counts_equal"] = bool(torch.equal(kept, rec_ref.tokens_per_expert))
    errors["dropped"] = [int(dropped), int(rec_ref.dropped)]
    errors["local_experts"] = layer.experts.w_in.to_local().shape[0]
    errors["dispatcher"] = type(layer.dispatcher).__name__
    return errors


class layer_container(torch.nn.Module):
    """parallelize_experts walks `moe_layers()`; wrap a bare layer."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def moe_layers(self):
        return [self.layer]


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = [run(case, rank, world) for case in CASES]
    if rank == 0:
        print(json.dumps(results), flush=True)
    dist.barrier()  # nobody tears the group down while a peer still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

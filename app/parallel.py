"""Scale out: FSDP2 plus expert parallelism on a 2-D device mesh, through Lightning's
`ModelParallelStrategy` (its `FSDPStrategy` refuses CPUs). gloo on CPU, NCCL on CUDA.

The mesh is (data_parallel, ep) over the world: Lightning names the second dimension
"tensor_parallel"; here it holds the expert-parallel groups. Every rank reads its own tokens.
- Expert weights: DTensors sharded over the ep dimension (moe.parallel), and FSDP-sharded over
  the data-parallel ranks that hold the same experts.
- Everything else: FSDP-sharded over all ranks (the mesh flattened), gradients averaged over all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from moe import Transformer
from moe.parallel import parallelize_experts

EP_DIM, DP_DIM = "tensor_parallel", "data_parallel"  # Lightning's mesh dimension names
PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ParallelConfig:
    ep: int = 1  # expert-parallel group size: divides the world size and moe.num_experts
    num_nodes: int = 1
    fsdp_param_dtype: str = "float32"  # FSDP2 mixed precision: dtype of gathered params ("bfloat16")

    def __post_init__(self) -> None:
        if self.ep < 1 or self.num_nodes < 1:
            raise ValueError("parallel.ep and parallel.num_nodes must be >= 1")
        if self.fsdp_param_dtype not in PARAM_DTYPES:
            raise ValueError(f"parallel.fsdp_param_dtype must be one of {', '.join(PARAM_DTYPES)}")


def needs_model_parallel(config: ParallelConfig, devices: int, resume_from: Path | None) -> bool:
    """Several processes, expert parallelism, or a distributed (folder) checkpoint to resume."""
    return devices * config.num_nodes > 1 or config.ep > 1 or (resume_from is not None and resume_from.is_dir())


def build_strategy(config: ParallelConfig, devices: int) -> Strategy | str:
    world = devices * config.num_nodes
    if world % config.ep:
        raise ValueError(f"parallel.ep={config.ep} must divide the number of processes ({world})")
    return ModelParallelStrategy(data_parallel_size=world // config.ep, tensor_parallel_size=config.ep)


def parallelize(model: Transformer, mesh: DeviceMesh, config: ParallelConfig) -> Transformer:
    """Apply expert parallelism, then FSDP2 bottom-up (one group per block, then the root)."""
    mp = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[config.fsdp_param_dtype], reduce_dtype=torch.float32)
    ep_mesh, dp_mesh = mesh[EP_DIM], mesh[DP_DIM]
    world_mesh = mesh._flatten("dp_ep") if mesh.ndim > 1 else mesh
    expert_params: set[torch.nn.Parameter] = set()
    if ep_mesh.size() > 1:
        parallelize_experts(model, ep_mesh)
        for layer in model.moe_layers():
            if dp_mesh.size() > 1:  # the data-parallel ranks that hold the same experts
                fully_shard(layer.experts, mesh=dp_mesh, mp_policy=mp)
            else:  # one copy of each expert: nothing to shard, and outside the world-wide groups
                expert_params.update(layer.experts.parameters())
    for block in model.layers:
        fully_shard(block, mesh=world_mesh, mp_policy=mp, ignored_params=_within(block, expert_params))
    fully_shard(model, mesh=world_mesh, mp_policy=mp, ignored_params=expert_params or None)
    return model


def _within(module: torch.nn.Module, params: set) -> set | None:
    mine = {p for p in module.parameters() if p in params}
    return mine or None

"""Where a non-finite value (NaN or inf) first appeared: the first module whose output holds one
(re-running a forward with a hook on every module), or the first parameter whose gradient or value
holds one.

Every function is a collective under FSDP / expert parallelism: each rank looks at its own tokens
and shards, and the answers are combined over all ranks, so every rank reports the same thing.
Call them on every rank at the same point.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe.experts import local_shard


def nonfinite_names(named: Iterable[tuple[str, Tensor | None]]) -> list[str]:
    """The names whose tensor holds a non-finite value on any rank, in the given order."""
    names, flags = [], []
    for name, tensor in named:
        names.append(name)
        bad = tensor is not None and not bool(torch.isfinite(local_shard(tensor)).all())
        flags.append(float(bad))
    if not names:
        return []
    found = _sum_over_ranks(torch.tensor(flags))
    return [name for name, flag in zip(names, found.tolist()) if flag > 0]


def first_nonfinite_output(model: nn.Module, forward: Callable[[], object]) -> str | None:
    """Run `forward()` with a hook on every module of `model`; describe the first module, in the
    order their forwards return (so the innermost first), whose output holds a non-finite value,
    e.g. "layers.1.ffn.router output logits_TE"; None if no output does on any rank.

    A module whose own parameters are non-finite says so: its children may not run as modules
    (the experts' weights are used inside one autograd function), so the parameter is the clue.
    """
    found: list[tuple[int, str, str]] = []  # (how many forwards had returned, module name, field)
    returned = [0]

    def hook(name: str):
        def check(module: nn.Module, args, output) -> None:
            returned[0] += 1
            field = None if found else _nonfinite_field(output)
            if field is not None:
                found.append((returned[0], name, field))
        return check

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    first = min((f for rank in _gather(found) for f in rank), default=None)
    if first is None:
        return None
    _, name, field = first
    bad = nonfinite_names(model.get_submodule(name).named_parameters(prefix=name))
    return (f"{name or 'model'} output" + (f" {field}" if field else "")
            + (f" (non-finite weights: {', '.join(bad[:3])})" if bad else ""))


def _nonfinite_field(output: object, path: str = "") -> str | None:
    """'' if `output` is a non-finite tensor, the path of the first non-finite tensor inside a
    tuple, list, dict or dataclass (e.g. "[1].aux_loss", "logits_TE"), or None."""
    if isinstance(output, Tensor):
        local = local_shard(output)
        return path.lstrip(".") if local.is_floating_point() and not bool(torch.isfinite(local).all()) else None
    if isinstance(output, (tuple, list)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(output))
    elif isinstance(output, dict):
        items = ((f"{path}.{k}", v) for k, v in output.items())
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = ((f"{path}.{f.name}", getattr(output, f.name)) for f in dataclasses.fields(output))
    else:
        return None
    for sub_path, value in items:
        field = _nonfinite_field(value, sub_path)
        if field is not None:
            return field
    return None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sum_over_ranks(tensor: Tensor) -> Tensor:
    if _distributed():
        tensor = tensor.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(tensor)
    return tensor.cpu()


def _gather(value: list) -> list[list]:
    if not _distributed():
        return [value]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone

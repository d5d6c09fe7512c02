"""Rank and world helpers over torch.distributed.

Every function is correct when torch.distributed is not available or not initialised: it then behaves as a
world of one process. Communication goes through torch.distributed only.
"""
import functools
import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "get_world_size",
    "get_rank",
    "get_local_rank",
    "get_local_size",
    "is_main_process",
    "synchronize",
    "all_gather",
    "gather",
    "shared_random_seed",
    "reduce_dict",
]

# Set by launch() when it starts the workers; otherwise read from torchrun's environment variables.
_LOCAL_PROCESS_GROUP = None
_LOCAL_SIZE: Optional[int] = None


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if _is_dist() else 1


def get_rank() -> int:
    """Rank of this process in the default group (0 without torch.distributed)."""
    return dist.get_rank() if _is_dist() else 0


def get_local_rank() -> int:
    """Rank of this process among the processes of its machine."""
    if not _is_dist():
        return 0
    if _LOCAL_PROCESS_GROUP is not None:
        return dist.get_rank(group=_LOCAL_PROCESS_GROUP)
    return int(os.environ.get("LOCAL_RANK", get_rank()))


def get_local_size() -> int:
    """Number of processes on this machine."""
    if not _is_dist():
        return 1
    if _LOCAL_SIZE is not None:
        return _LOCAL_SIZE
    return int(os.environ.get("LOCAL_WORLD_SIZE", get_world_size()))


def is_main_process() -> bool:
    """True on the process that writes files (global rank 0)."""
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes; a no-op with a single process."""
    if get_world_size() > 1:
        if dist.get_backend() == dist.Backend.NCCL and torch.cuda.is_available():
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@functools.lru_cache()
def _gloo_group():
    # Object collectives on the CPU: a gloo group even when the default backend is NCCL.
    if dist.get_backend() == "nccl":
        return dist.new_group(backend="gloo")
    return dist.group.WORLD


def all_gather(data: Any, group=None) -> List[Any]:
    """Gathers any picklable object from every rank.

    Returns:
        list: one entry per rank, in rank order.
    """
    if get_world_size() == 1:
        return [data]
    group = group if group is not None else _gloo_group()
    output = [None for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(output, data, group=group)
    return output


def gather(data: Any, dst: int = 0, group=None) -> List[Any]:
    """Gathers any picklable object to rank ``dst``.

    Returns:
        list: on ``dst``, one entry per rank in rank order; on other ranks, an empty list.
    """
    if get_world_size() == 1:
        return [data]
    group = group if group is not None else _gloo_group()
    if dist.get_rank(group=group) == dst:
        output = [None for _ in range(dist.get_world_size(group))]
        dist.gather_object(data, output, dst=dst, group=group)
        return output
    dist.gather_object(data, None, dst=dst, group=group)
    return []


def shared_random_seed() -> int:
    """A random integer that is the same on every rank (rank 0's draw)."""
    seed = int(np.random.randint(2**31))
    return all_gather(seed)[0]


def reduce_dict(input_dict: Dict[str, torch.Tensor], average: bool = True) -> Dict[str, torch.Tensor]:
    """Reduces the values of a dict of scalar tensors across ranks in one collective.

    Args:
        input_dict: the same keys on every rank; values are 0-dim tensors on this rank's device.
        average: average instead of sum.

    Returns:
        dict with the same keys and reduced values (on every rank).
    """
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict.keys())
        values = torch.stack([input_dict[k] for k in names])
        dist.all_reduce(values)
        if average:
            values /= world_size
        return dict(zip(names, values))

"""Rank and world helpers over torch.distributed.

Every function is correct when torch.distributed is not available or not initialised: it then behaves as a
world of one process. Communication goes through torch.distributed only.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
    "all_gather_ints",
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


# (default group, its gloo twin): object collectives run on the CPU, so with an NCCL default group they go
# through a gloo group made once per default group. Keyed on the default group so that a new process group
# (after destroy_process_group and init_process_group) never reuses a group of the old one.
_CPU_GROUP: Optional[Tuple[Any, Any]] = None


def _cpu_group() -> Optional[dist.ProcessGroup]:
    """The group for object collectives: None (the default group) unless the default backend is NCCL."""
    global _CPU_GROUP
    if dist.get_backend() != dist.Backend.NCCL:
        return None
    world = dist.group.WORLD
    if _CPU_GROUP is None or _CPU_GROUP[0] is not world:
        _CPU_GROUP = (world, dist.new_group(backend="gloo"))
    return _CPU_GROUP[1]


def all_gather(data: Any, group: Optional[dist.ProcessGroup] = None) -> List[Any]:
    """Gathers any picklable object from every rank of ``group``.

    Args:
        data: any picklable object.
        group: the group to gather over; by default all processes (through a gloo group when the default
            backend is NCCL, so that pickled bytes never travel through GPU memory).

    Returns:
        list: one entry per rank of the group, in rank order.
    """
    if get_world_size() == 1:
        return [data]
    group = group if group is not None else _cpu_group()
    output: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(output, data, group=group)
    return output


def all_gather_ints(values: Sequence[int]) -> List[List[int]]:
    """Gathers a few integers (as many on every rank) from every process: one small collective on the CPU,
    with no pickling, also when the default backend is NCCL. Cheap enough to check agreement before a larger
    collective whose shapes must match.

    Returns:
        list: one list of ints per rank, in rank order.
    """
    if get_world_size() == 1:
        return [list(values)]
    local = torch.tensor(list(values), dtype=torch.int64)
    output = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(output, local, group=_cpu_group())
    return [t.tolist() for t in output]


def gather(data: Any, dst: int = 0, group: Optional[dist.ProcessGroup] = None) -> List[Any]:
    """Gathers any picklable object to the process of global rank ``dst``.

    Args:
        data: any picklable object.
        dst: global rank of the destination (as in ``torch.distributed.gather_object``, even with ``group``).
        group: the group to gather over; by default all processes.

    Returns:
        list: on ``dst``, one entry per rank of the group in rank order; on other ranks, an empty list.
    """
    if get_world_size() == 1:
        return [data]
    group = group if group is not None else _cpu_group()
    if get_rank() == dst:
        output: List[Any] = [None] * dist.get_world_size(group)
        dist.gather_object(data, output, dst=dst, group=group)
        return output
    dist.gather_object(data, None, dst=dst, group=group)
    return []


def shared_random_seed() -> int:
    """A random integer in ``[0, 2**31)`` that is the same on every rank (rank 0's draw).

    Every rank draws from its global numpy RNG, so the RNG streams of all ranks advance alike.
    """
    seed = int(np.random.randint(2**31))
    return all_gather(seed)[0]


def reduce_dict(input_dict: Dict[str, torch.Tensor], average: bool = True) -> Dict[str, torch.Tensor]:
    """Reduces the values of a dict of scalar tensors across ranks in one collective.

    Args:
        input_dict: the same keys on every rank (insertion order may differ); values are 0-dim tensors of
            one dtype on this rank's device (a CUDA device with the NCCL backend). The keys are not checked
            across ranks: that would cost a second collective on every call.
        average: average instead of sum. Averaging integer tensors gives floating-point results.

    Returns:
        dict with the same keys, in the same order, and the reduced values (on every rank). With a single
        process, ``input_dict`` itself.
    """
    world_size = get_world_size()
    if world_size < 2 or not input_dict:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict.keys())
        values = torch.stack([input_dict[k] for k in names])
        dist.all_reduce(values)
        if average:
            values = values / world_size
        reduced = dict(zip(names, values))
        return {k: reduced[k] for k in input_dict}

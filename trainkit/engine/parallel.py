"""Fully sharded data parallel: torch's own ``fully_shard`` (FSDP2) applied with a simple wrap policy.

trainkit writes no sharding of its own. :func:`create_fsdp_model` calls
``torch.distributed.fsdp.fully_shard`` on each block the policy names, then on the root module, as torch's
FSDP2 documentation recommends. Each process then holds only its shard of every parameter (a ``DTensor``),
of every gradient and, once the optimizer is built over those parameters, of the optimizer state.

Build the optimizer *after* sharding: an optimizer built before holds the full, unsharded parameters, which
``fully_shard`` replaces.
"""
import logging
from typing import Any, List, Optional, Sequence

import torch
from torch import nn

from trainkit.utils import comm

__all__ = ["create_fsdp_model", "fsdp_blocks", "is_fsdp_model", "check_equal_batches"]

logger = logging.getLogger(__name__)


def fsdp_blocks(model: nn.Module, wrap_classes: Sequence[str] = ()) -> List[nn.Module]:
    """The submodules that :func:`create_fsdp_model` shards on their own, before the root.

    Args:
        model: the root module.
        wrap_classes: class names (``type(m).__name__``); every submodule of one of these classes is a block,
            outermost first (a block inside a block is not listed again). Empty: every direct child of the
            root that holds parameters (the children of a ``ModuleList``/``ModuleDict`` child, which has no
            forward of its own).

    Raises:
        ValueError: a name in ``wrap_classes`` matches no submodule (a typo would silently shard nothing).
    """
    if not wrap_classes:
        return _children_with_parameters(model)
    wanted = set(wrap_classes)
    blocks: List[nn.Module] = []
    prefixes: List[str] = []
    for name, module in model.named_modules():
        if module is model or type(module).__name__ not in wanted:
            continue
        if any(name.startswith(prefix + ".") for prefix in prefixes):
            continue  # inside a block already listed: sharded with it
        blocks.append(module)
        prefixes.append(name)
    missing = sorted(wanted - {type(m).__name__ for m in model.modules() if m is not model})
    if missing:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(
            f"MODEL.FSDP.WRAP_CLASSES names {missing}, but the model has no submodule of that class. Its classes: "
            f"{present}. Fix the names, or leave the list empty to shard every child of the root."
        )
    return blocks


def _children_with_parameters(module: nn.Module) -> List[nn.Module]:
    # A ModuleList/ModuleDict has no forward of its own (fully_shard refuses it): its children are the blocks.
    blocks: List[nn.Module] = []
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            blocks += _children_with_parameters(child)
        elif any(True for _ in child.parameters()):
            blocks.append(child)
    return blocks


def create_fsdp_model(
    model: nn.Module,
    *,
    wrap_classes: Sequence[str] = (),
    param_dtype: Optional[torch.dtype] = None,
    reduce_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Shards ``model`` in place with ``fully_shard``: each block of :func:`fsdp_blocks`, then the root.

    Every process starts from rank 0's initial weights and buffers (broadcast before sharding, as DDP does).

    Without ``torch.distributed`` initialised (one process) the model is returned as it is, like
    ``create_ddp_model`` does: there is nothing to shard across.

    Args:
        model: the model, on its device (the CPU works with the gloo backend).
        wrap_classes: see :func:`fsdp_blocks`.
        param_dtype: dtype of the all-gathered parameters used by forward and backward (e.g.
            ``torch.bfloat16``); None keeps the parameters' own dtype. The sharded parameters that the
            optimizer updates stay in their own dtype.
        reduce_dtype: dtype of the gradient reduce-scatter; None uses ``param_dtype``.

    Returns:
        the same module object, now an ``FSDPModule`` whose parameters are ``DTensor`` shards.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        logger.info("MODEL.PARALLEL fsdp with one process and no process group: the model is not sharded.")
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if param_dtype is not None or reduce_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if next(model.parameters()).is_cuda:
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["mesh"] = init_device_mesh("cuda", (comm.get_world_size(),))
    _broadcast_from_rank_0(model)
    blocks = fsdp_blocks(model, wrap_classes)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    logger.info(
        "Sharded the model over %d processes with fully_shard: %d blocks (%s), then the root.",
        comm.get_world_size(), len(blocks), ", ".join(sorted({type(b).__name__ for b in blocks})) or "none",
    )
    return model


def _broadcast_from_rank_0(model: nn.Module) -> None:
    # Every process starts from rank 0's initial weights, as DistributedDataParallel does when it wraps a model.
    # fully_shard keeps each process's own slice of its own initialisation, and each process seeds its RNGs
    # differently (SEED + rank), so without this the shards would come from different models.
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            torch.distributed.broadcast(tensor, src=0)


def is_fsdp_model(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` (its parameters are then ``DTensor`` shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def check_equal_batches(data_loader: Any, dataset_name: str) -> None:
    """Raises ``ValueError`` unless every process has as many batches of ``data_loader`` as the others.

    A sharded model's forward is a collective: a process with one batch more would wait for the others forever.
    """
    batches = comm.all_gather(len(data_loader))
    if len(set(batches)) > 1:
        raise ValueError(
            f"Evaluating a sharded (MODEL.PARALLEL fsdp) model on {dataset_name!r} needs the same number of batches "
            f"on every process, got {batches} by rank: its forward is a collective. Use a data set size divisible by "
            "the number of processes times the test batch size, or evaluate the checkpoint in one process."
        )

"""Forgiving model-weight loading: skip shape mismatches, report missing and unexpected keys readably.

Fine-tuning routinely loads weights into a model whose head differs from the one that was saved, so loading
is non-strict, but nothing is skipped silently: every skipped tensor and every missing or unexpected key is
logged as a warning.
"""
import collections
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Tuple

import torch
from torch import nn

__all__ = [
    "unwrap_model", "strip_module_prefix", "strip_compile_prefix", "format_keys", "load_model_state_dict",
    "ModelLoadResult",
]

logger = logging.getLogger(__name__)

_WRAPPER_TYPES = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _is_compile_wrapper(model: nn.Module) -> bool:
    # torch.compile(model) returns an OptimizedModule holding the model as ``_orig_mod``. Its module is
    # imported only once torch.compile has been used, so a model cannot be one before that.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel/DataParallel wrappers and ``torch.compile(model)``'s wrapper,
    or ``model`` itself."""
    while True:
        if isinstance(model, _WRAPPER_TYPES):
            model = model.module
        elif _is_compile_wrapper(model):
            model = model._orig_mod
        else:
            return model


def strip_compile_prefix(state_dict: Mapping[str, Any], source: str = "checkpoint") -> Dict[str, Any]:
    """Remove the ``_orig_mod.`` parts that the keys of a state_dict taken from ``torch.compile(module)``'s
    wrapper carry (at the start, or after the name of a compiled submodule), logging that it did.

    trainkit never saves them (it compiles in place, and saves the module inside any wrapper); files written
    elsewhere may have them.
    """
    part = "_orig_mod."
    if not any(part in key for key in state_dict):
        return dict(state_dict)
    logger.info("Removing the '%s' prefix of torch.compile's wrapper from the keys of %s.", part, source)
    return {key.replace(part, ""): value for key, value in state_dict.items()}


def strip_module_prefix(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Remove the ``module.`` prefix that a state_dict taken from a DDP/DataParallel wrapper carries.

    The prefix is removed only when every key has it, so a model with a submodule named ``module`` keeps its
    keys.
    """
    prefix = "module."
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def format_keys(keys: Iterable[str]) -> str:
    """Format parameter names one module per line, e.g. ``  head.fc.{bias, weight}``."""
    groups: Dict[str, List[str]] = collections.defaultdict(list)
    for key in sorted(keys):
        parent, _, leaf = key.rpartition(".")
        groups[parent].append(leaf)
    lines = []
    for parent, leaves in groups.items():
        leaf_text = leaves[0] if len(leaves) == 1 else "{" + ", ".join(leaves) + "}"
        lines.append(f"  {parent + '.' if parent else ''}{leaf_text}")
    return "\n".join(lines)


@dataclass
class ModelLoadResult:
    """What :func:`load_model_state_dict` could not load.

    Attributes:
        missing_keys: model entries absent from the checkpoint (left as they were).
        unexpected_keys: checkpoint entries the model has no place for (ignored).
        shape_mismatches: ``{key: (shape in checkpoint, shape in model)}`` for entries skipped.
    """

    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    shape_mismatches: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=dict)


def _pop_shape_mismatches(
    model_state: Mapping[str, Any], state_dict: Dict[str, Any], source: str
) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    mismatches = {}
    for key in list(state_dict):
        target, value = model_state.get(key), state_dict[key]
        if not isinstance(target, torch.Tensor) or not isinstance(value, torch.Tensor):
            continue
        if isinstance(target, nn.parameter.UninitializedParameter):
            continue  # a lazy module takes whatever shape it is given
        if tuple(value.shape) != tuple(target.shape):
            mismatches[key] = (tuple(value.shape), tuple(target.shape))
            del state_dict[key]
            logger.warning(
                "Skip loading '%s' from %s: shape %s in the checkpoint, %s in the model.",
                key,
                source,
                tuple(value.shape),
                tuple(target.shape),
            )
        elif value.dtype != target.dtype:
            # load_state_dict's copy_ casts silently; a float16 checkpoint into a float32 model loses precision.
            logger.warning(
                "Loading '%s' from %s: cast from %s in the checkpoint to %s in the model.",
                key, source, value.dtype, target.dtype,
            )
    return mismatches


def load_model_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any], source: str = "checkpoint"
) -> ModelLoadResult:
    """Load ``state_dict`` into ``model`` non-strictly, logging everything that did not load.

    ``model`` may be wrapped in DistributedDataParallel/DataParallel or compiled, and ``state_dict`` may carry
    the ``module.`` prefix of such a wrapper or the ``_orig_mod.`` of ``torch.compile``'s; either way the
    weights land in the same parameters.

    Args:
        model: the model to load into (modified in place).
        state_dict: parameter and buffer tensors by name.
        source: where the weights come from, for log messages (usually the file path).

    Returns:
        A :class:`ModelLoadResult` listing what was skipped.
    """
    model = unwrap_model(model)
    model_state = model.state_dict()
    if not any("_orig_mod." in key for key in model_state):  # (a model with a torch.compile'd child keeps them)
        state_dict = strip_compile_prefix(state_dict, source)
    state_dict = strip_module_prefix(state_dict)
    mismatches = _pop_shape_mismatches(model_state, state_dict, source)
    incompatible = model.load_state_dict(state_dict, strict=False)
    result = ModelLoadResult(
        missing_keys=[key for key in incompatible.missing_keys if key not in mismatches],
        unexpected_keys=list(incompatible.unexpected_keys),
        shape_mismatches=mismatches,
    )
    if result.missing_keys:
        logger.warning(
            "Some model parameters or buffers are not in %s and keep their current values:\n%s",
            source,
            format_keys(result.missing_keys),
        )
    if result.unexpected_keys:
        logger.warning(
            "Some entries of %s are not used by the model and were ignored:\n%s",
            source,
            format_keys(result.unexpected_keys),
        )
    return result

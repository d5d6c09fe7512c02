"""Optimizers, gradient clipping and LR schedules built from a config (names follow detectron2's solver)."""
from .build import (
    build_lr_scheduler,
    build_optimizer,
    get_default_optimizer_params,
    maybe_add_gradient_clipping,
    reduce_param_groups,
)
from .lr_scheduler import LRMultiplier, StepWithFixedGammaParamScheduler, WarmupParamScheduler

__all__ = [
    "build_optimizer",
    "build_lr_scheduler",
    "get_default_optimizer_params",
    "reduce_param_groups",
    "maybe_add_gradient_clipping",
    "LRMultiplier",
    "WarmupParamScheduler",
    "StepWithFixedGammaParamScheduler",
]

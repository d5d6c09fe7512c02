"""Config to optimizer and LR scheduler: build_optimizer, build_lr_scheduler and their helpers."""
import functools
import logging
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Type

import torch
from fvcore.common.param_scheduler import CosineParamScheduler, MultiStepParamScheduler, ParamScheduler

from ..config import CfgNode
from .lr_scheduler import LRMultiplier, StepWithFixedGammaParamScheduler, WarmupParamScheduler

__all__ = [
    "build_optimizer",
    "build_lr_scheduler",
    "get_default_optimizer_params",
    "reduce_param_groups",
    "maybe_add_gradient_clipping",
]

logger = logging.getLogger(__name__)

# Parameters of these modules get SOLVER.WEIGHT_DECAY_NORM.
NORM_MODULE_TYPES = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.GroupNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)

_OPTIMIZERS = ("SGD", "AdamW")
_CLIP_TYPES = ("value", "norm", "full_model")
_LR_SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR", "WarmupStepWithFixedGammaLR")

ParamGroups = List[Dict[str, Any]]


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Builds the optimizer named by ``SOLVER.OPTIMIZER`` ("SGD" or "AdamW", any case) for ``model``.

    Parameter groups come from :func:`get_default_optimizer_params` (per-parameter weight decay and LR for norm
    layers and biases); gradient clipping is added when ``SOLVER.CLIP_GRADIENTS.ENABLED``.

    SGD uses ``BASE_LR``, ``MOMENTUM``, ``NESTEROV`` and ``WEIGHT_DECAY``; AdamW uses ``BASE_LR``, ``BETAS`` and
    ``WEIGHT_DECAY``.
    """
    solver = cfg.SOLVER
    name = solver.OPTIMIZER.lower()
    if name not in [n.lower() for n in _OPTIMIZERS]:
        raise ValueError(
            f"Unknown SOLVER.OPTIMIZER {solver.OPTIMIZER!r}; valid ones (any case): {', '.join(_OPTIMIZERS)}"
        )
    params = get_default_optimizer_params(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        bias_lr_factor=solver.BIAS_LR_FACTOR,
        weight_decay_bias=solver.WEIGHT_DECAY_BIAS,
    )
    if name == "sgd":
        optimizer_cls = maybe_add_gradient_clipping(cfg, torch.optim.SGD)
        return optimizer_cls(
            params,
            lr=solver.BASE_LR,
            momentum=solver.MOMENTUM,
            nesterov=solver.NESTEROV,
            weight_decay=solver.WEIGHT_DECAY,
        )
    optimizer_cls = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
    return optimizer_cls(params, lr=solver.BASE_LR, betas=tuple(solver.BETAS), weight_decay=solver.WEIGHT_DECAY)


def _with_bias_overrides(
    overrides: Optional[Dict[str, Dict[str, float]]], base_lr: Optional[float], bias_lr_factor: float,
    weight_decay_bias: Optional[float],
) -> Dict[str, Dict[str, float]]:
    # A copy of `overrides` where bias_lr_factor and weight_decay_bias became overrides["bias"].
    overrides = {name: dict(values) for name, values in (overrides or {}).items()}
    bias_overrides: Dict[str, float] = {}
    if bias_lr_factor != 1.0:
        if base_lr is None:
            raise ValueError(f"bias_lr_factor={bias_lr_factor} needs base_lr; pass base_lr too")
        bias_overrides["lr"] = base_lr * bias_lr_factor
    if weight_decay_bias is not None:
        bias_overrides["weight_decay"] = weight_decay_bias
    if bias_overrides:
        if "bias" in overrides:
            raise ValueError(
                "overrides['bias'] conflicts with bias_lr_factor/weight_decay_bias; set the bias's values in one place"
            )
        overrides["bias"] = bias_overrides
    return overrides


def get_default_optimizer_params(
    model: torch.nn.Module,
    base_lr: Optional[float] = None,
    weight_decay: Optional[float] = None,
    weight_decay_norm: Optional[float] = None,
    bias_lr_factor: float = 1.0,
    weight_decay_bias: Optional[float] = None,
    overrides: Optional[Dict[str, Dict[str, float]]] = None,
) -> ParamGroups:
    """Returns parameter groups for an optimizer, with per-parameter hyperparameters.

    Every trainable parameter is listed once (a parameter shared by several modules is de-duplicated), and
    parameters with identical hyperparameters share a group, so the optimizer has few groups. The rules, in the
    order they apply (a later rule wins):

    1. ``lr=base_lr`` and ``weight_decay=weight_decay`` (each only when not None; otherwise the optimizer's
       default applies).
    2. Parameters of norm layers (:data:`NORM_MODULE_TYPES`): ``weight_decay=weight_decay_norm`` (when not None).
    3. ``overrides[name]`` for parameters whose own name (the last part of the dotted name, e.g. ``"bias"`` or
       ``"embedding"``) is ``name``. ``bias_lr_factor`` and ``weight_decay_bias`` are shorthands for
       ``overrides["bias"]``; so, as in detectron2, a norm layer's bias gets ``weight_decay_bias`` when that is set.

    Args:
        model: the model whose trainable parameters to group.
        base_lr: the LR of every group; needed when ``bias_lr_factor != 1``.
        weight_decay: the weight decay of every parameter without a rule of its own.
        weight_decay_norm: the weight decay of norm-layer parameters. None: same as ``weight_decay``.
        bias_lr_factor: the LR of biases is ``base_lr * bias_lr_factor``.
        weight_decay_bias: the weight decay of biases. None: same as the parameter would get otherwise.
        overrides: ``{param_name: {hyperparameter: value}}``, e.g. ``{"embedding": {"weight_decay": 0.0}}``.

    Returns:
        A list of ``{"params": [...], **hyperparameters}`` dicts for a ``torch.optim.Optimizer``.
    """
    overrides = _with_bias_overrides(overrides, base_lr, bias_lr_factor, weight_decay_bias)
    defaults: Dict[str, float] = {}
    if base_lr is not None:
        defaults["lr"] = base_lr
    if weight_decay is not None:
        defaults["weight_decay"] = weight_decay

    groups: ParamGroups = []
    seen = set()
    for module in model.modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            hyperparams = dict(defaults)
            if isinstance(module, NORM_MODULE_TYPES) and weight_decay_norm is not None:
                hyperparams["weight_decay"] = weight_decay_norm
            hyperparams.update(overrides.get(param_name, {}))
            groups.append({"params": [param], **hyperparams})
    return reduce_param_groups(groups)


def reduce_param_groups(params: ParamGroups) -> ParamGroups:
    """Merges parameter groups with identical hyperparameters (in order of first appearance).

    Each parameter is expected in one group only. Fewer groups means fewer Python loops and larger fused kernels
    in the optimizer step.
    """
    merged: Dict[tuple, List[torch.nn.Parameter]] = defaultdict(list)
    for group in params:
        hyperparams = tuple(sorted((k, v) for k, v in group.items() if k != "params"))
        merged[hyperparams].extend(group["params"])
    return [{"params": group_params, **dict(hyperparams)} for hyperparams, group_params in merged.items()]


def maybe_add_gradient_clipping(cfg: CfgNode, optimizer: Type[torch.optim.Optimizer]) -> Type[torch.optim.Optimizer]:
    """Returns ``optimizer`` (a class), or a subclass whose ``step()`` clips gradients first.

    Clipping is added when ``SOLVER.CLIP_GRADIENTS.ENABLED``. ``CLIP_TYPE``:

    - ``"value"``: every gradient element is clamped to ``[-CLIP_VALUE, CLIP_VALUE]``.
    - ``"norm"``: each parameter's gradient is scaled down to a ``NORM_TYPE``-norm of at most ``CLIP_VALUE``,
      one parameter at a time (detectron2's meaning).
    - ``"full_model"``: the gradients of all parameters together are scaled down to a total norm of at most
      ``CLIP_VALUE`` (``torch.nn.utils.clip_grad_norm_`` over the model; what most hand-written loops do).

    With ``torch.amp.GradScaler``, ``scaler.step(optimizer)`` unscales the gradients before it calls
    ``optimizer.step()``, so clipping sees the true gradients.
    """
    clip_cfg = cfg.SOLVER.CLIP_GRADIENTS
    if not clip_cfg.ENABLED:
        return optimizer
    return _optimizer_class_with_gradient_clipping(optimizer, _create_gradient_clipper(clip_cfg))


def _create_gradient_clipper(clip_cfg) -> Callable[[List[torch.Tensor]], None]:
    clip_type = clip_cfg.CLIP_TYPE
    if clip_type not in _CLIP_TYPES:
        raise ValueError(
            f"Unknown SOLVER.CLIP_GRADIENTS.CLIP_TYPE {clip_type!r}; valid ones: {', '.join(_CLIP_TYPES)}"
        )
    if not clip_cfg.CLIP_VALUE > 0:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be positive, got {clip_cfg.CLIP_VALUE}")
    if clip_type == "value":
        return functools.partial(torch.nn.utils.clip_grad_value_, clip_value=clip_cfg.CLIP_VALUE)
    clip_norm = functools.partial(
        torch.nn.utils.clip_grad_norm_, max_norm=clip_cfg.CLIP_VALUE, norm_type=clip_cfg.NORM_TYPE
    )
    if clip_type == "full_model":
        return clip_norm
    return functools.partial(_clip_each, clip_norm)


def _clip_each(clip: Callable[[torch.Tensor], Any], params: List[torch.Tensor]) -> None:
    for param in params:
        clip(param)


def _optimizer_class_with_gradient_clipping(
    optimizer: Type[torch.optim.Optimizer], clip: Callable[[List[torch.Tensor]], None]
) -> Type[torch.optim.Optimizer]:
    """Returns a subclass of ``optimizer`` that calls ``clip(parameters with a gradient)`` before each step.

    The clipping runs as a step pre-hook that the subclass registers when it is built, not in an overriding
    ``step()``: torch wraps every optimizer class's ``step()`` to run the step hooks, so an override calling
    ``super().step()`` would run every step hook twice.
    """

    def clip_before_step(opt: torch.optim.Optimizer, args: tuple, kwargs: Dict[str, Any]) -> None:
        # args is (optimizer, closure?) as step() received it.
        if kwargs.get("closure") is not None or len(args) > 1:
            raise ValueError(
                "An optimizer with gradient clipping cannot step(closure): the closure would compute gradients "
                "after they were clipped. Call loss.backward() and then step() without a closure."
            )
        clip([p for group in opt.param_groups for p in group["params"] if p.grad is not None])

    class OptimizerWithGradientClipping(optimizer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.register_step_pre_hook(clip_before_step)

    OptimizerWithGradientClipping.__name__ = f"{optimizer.__name__}WithGradientClipping"
    OptimizerWithGradientClipping.__qualname__ = OptimizerWithGradientClipping.__name__
    return OptimizerWithGradientClipping


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> LRMultiplier:
    """Builds the LR schedule named by ``SOLVER.LR_SCHEDULER_NAME``, with warmup, as an :class:`LRMultiplier`.

    - ``WarmupMultiStepLR``: the LR is multiplied by ``GAMMA`` at each iteration in ``STEPS``.
    - ``WarmupCosineLR``: half a cosine from ``BASE_LR`` down to ``BASE_LR_END`` at ``MAX_ITER``.
    - ``WarmupStepWithFixedGammaLR``: ``NUM_DECAYS`` multiplications by ``GAMMA`` at equal intervals.

    The warmup (``WARMUP_METHOD``, ``WARMUP_FACTOR``, ``RESCALE_INTERVAL``) takes the first ``WARMUP_ITERS``
    iterations (all of them if ``WARMUP_ITERS >= MAX_ITER``).
    """
    solver = cfg.SOLVER
    max_iter = solver.MAX_ITER
    if max_iter <= 0:
        raise ValueError(f"SOLVER.MAX_ITER must be a positive number of iterations, got {max_iter}")
    if solver.WARMUP_ITERS < 0:
        raise ValueError(f"SOLVER.WARMUP_ITERS must be >= 0, got {solver.WARMUP_ITERS}")
    schedule = WarmupParamScheduler(
        _build_base_schedule(solver),
        warmup_factor=solver.WARMUP_FACTOR,
        warmup_length=min(solver.WARMUP_ITERS / max_iter, 1.0),
        warmup_method=solver.WARMUP_METHOD,
        rescale_interval=solver.RESCALE_INTERVAL,
    )
    return LRMultiplier(optimizer, multiplier=schedule, max_iter=max_iter)


def _build_base_schedule(solver) -> ParamScheduler:
    name = solver.LR_SCHEDULER_NAME
    if name == "WarmupMultiStepLR":
        steps = _steps_before_max_iter(solver.STEPS, solver.MAX_ITER)
        return MultiStepParamScheduler(
            values=[solver.GAMMA**k for k in range(len(steps) + 1)],
            milestones=steps,
            num_updates=solver.MAX_ITER,
        )
    if name == "WarmupCosineLR":
        # The schedule multiplies BASE_LR; with BASE_LR == 0 every LR is 0 whatever the end value.
        end_value = solver.BASE_LR_END / solver.BASE_LR if solver.BASE_LR != 0 else 0.0
        return CosineParamScheduler(1.0, end_value)
    if name == "WarmupStepWithFixedGammaLR":
        return StepWithFixedGammaParamScheduler(
            base_value=1.0, gamma=solver.GAMMA, num_decays=solver.NUM_DECAYS, num_updates=solver.MAX_ITER
        )
    raise ValueError(f"Unknown SOLVER.LR_SCHEDULER_NAME {name!r}; valid ones: {', '.join(_LR_SCHEDULERS)}")


def _steps_before_max_iter(steps: Iterable[int], max_iter: int) -> List[int]:
    """SOLVER.STEPS without the steps at or past MAX_ITER (they could never take effect), with a warning."""
    steps = list(steps)
    if any(not isinstance(s, int) or s <= 0 for s in steps) or steps != sorted(set(steps)):
        raise ValueError(f"SOLVER.STEPS must be positive iterations in increasing order, got {tuple(steps)}")
    kept = [s for s in steps if s < max_iter]
    dropped = steps[len(kept) :]
    if dropped:
        logger.warning(
            "SOLVER.STEPS %s are at or past SOLVER.MAX_ITER=%d and are ignored; the LR schedule has steps %s",
            tuple(dropped),
            max_iter,
            tuple(kept),
        )
    return kept

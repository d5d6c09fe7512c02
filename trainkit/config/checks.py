"""The ranges of the built-in config keys: a value of the right type that makes no sense is caught before a run.

:func:`check_config_values` raises ``ValueError`` for a value out of its range (naming the key, the value and the
range) and logs a warning for a value that trains but probably not as meant. ``DefaultTrainer`` and
``default_setup`` call it. Keys that your own code adds are not checked here.
"""
import difflib
import logging
import math
from typing import Any, Callable, List, Sequence, Tuple

__all__ = ["WRITER_NAMES", "check_config_values", "check_writer_names"]

logger = logging.getLogger(__name__)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# torch.compile's modes (torch.compile's docstring lists them).
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# (key, test, the range in words). A value that fails its test is an error.
_RANGES: List[Tuple[str, Callable[[Any], bool], str]] = [
    ("MODEL.NUM_CLASSES", lambda v: v >= 1, "an int >= 1"),
    ("MODEL.MLP.IN_FEATURES", lambda v: v >= 1, "an int >= 1"),
    ("MODEL.MLP.HIDDEN_DIMS", lambda v: all(d >= 1 for d in v), "a list of ints >= 1"),
    ("MODEL.MLP.DROPOUT", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    ("MODEL.PARALLEL", lambda v: v in ("ddp", "fsdp"), "'ddp' or 'fsdp'"),
    ("MODEL.FSDP.WRAP_CLASSES", lambda v: all(isinstance(c, str) and c for c in v), "a list of class names"),
    ("MODEL.CONVNET.IN_CHANNELS", lambda v: v >= 1, "an int >= 1"),
    ("MODEL.CONVNET.CHANNELS", lambda v: len(v) >= 1 and all(c >= 1 for c in v), "a non-empty list of ints >= 1"),
    ("MODEL.CONVNET.DROPOUT", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    ("MODEL.COMPILE_MODE", lambda v: v in _COMPILE_MODES, " or ".join(map(repr, _COMPILE_MODES))),
    ("MODEL.COMPILE_BACKEND", lambda v: isinstance(v, str) and v != "", "a torch.compile backend, e.g. 'inductor'"),
    ("INPUT.AUGMENT.MAX_SHIFT", lambda v: v >= 0, "a number of pixels >= 0"),
    ("DATALOADER.NUM_WORKERS", lambda v: v >= 0, "a number of processes >= 0"),
    ("SOLVER.MAX_ITER", lambda v: v >= 1, "a number of iterations >= 1"),
    ("SOLVER.BASE_LR", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("SOLVER.BASE_LR_END", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("SOLVER.MOMENTUM", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("SOLVER.BETAS", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ("SOLVER.WEIGHT_DECAY", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("SOLVER.WEIGHT_DECAY_NORM", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("SOLVER.WEIGHT_DECAY_BIAS", lambda v: v is None or (_number(v) and v >= 0), "None or a finite number >= 0"),
    ("SOLVER.GAMMA", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("SOLVER.STEPS", lambda v: all(s >= 0 for s in v) and list(v) == sorted(v), "increasing iterations >= 0"),
    ("SOLVER.NUM_DECAYS", lambda v: v >= 1, "an int >= 1"),
    ("SOLVER.WARMUP_FACTOR", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("SOLVER.WARMUP_ITERS", lambda v: v >= 0, "a number of iterations >= 0"),
    ("SOLVER.WARMUP_METHOD", lambda v: v in ("linear", "constant"), "'linear' or 'constant'"),
    ("SOLVER.CHECKPOINT_PERIOD", lambda v: v >= 1, "a number of iterations >= 1"),
    ("SOLVER.CHECKPOINT_MAX_TO_KEEP", lambda v: v >= 0, "a number of files >= 0 (0 keeps all)"),
    ("SOLVER.CHECKPOINT_ASYNC", lambda v: isinstance(v, bool), "True or False"),
    ("SOLVER.IMS_PER_BATCH", lambda v: v >= 1, "a batch size >= 1"),
    ("SOLVER.GRAD_ACCUM_STEPS", lambda v: v >= 1, "a number of micro-batches >= 1 (1: no accumulation)"),
    ("SOLVER.REFERENCE_WORLD_SIZE", lambda v: v >= 0, "a number of processes >= 0 (0: no scaling)"),
    ("SOLVER.BIAS_LR_FACTOR", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", lambda v: v in ("value", "norm", "full_model"),
     "'value', 'norm' or 'full_model'"),
    ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("SOLVER.CLIP_GRADIENTS.NORM_TYPE", lambda v: v > 0, "a number > 0 (inf for the max norm)"),
    ("SOLVER.AMP.PRECISION", lambda v: v in ("float16", "bfloat16"), "'float16' or 'bfloat16'"),
    ("SOLVER.LOG_PERIOD", lambda v: v >= 1, "a number of iterations >= 1"),
    ("TEST.EVAL_PERIOD", lambda v: v >= 0, "a number of iterations >= 0 (0: only after the last iteration)"),
    ("TEST.PRECISE_BN.NUM_ITER", lambda v: v >= 1, "a number of batches >= 1"),
    ("MODEL_EMA.DECAY", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1] (e.g. 0.999)"),
    ("MODEL_EMA.WARMUP_ITERS", lambda v: v >= 0, "a number of updates >= 0 (0: no warm-up)"),
    ("DIST.TIMEOUT_S", lambda v: v > 0, "a number of seconds > 0"),
]


# The names the WRITERS list may hold (DefaultTrainer builds them in trainkit/engine/defaults.py).
WRITER_NAMES = ("json", "tensorboard", "console", "csv", "mlflow", "wandb")


def check_writer_names(names: Sequence[str]) -> None:
    """Raises ``ValueError`` for a ``WRITERS`` entry that is not one of :data:`WRITER_NAMES`, or a repeated one."""
    for name in names:
        if name not in WRITER_NAMES:
            close = difflib.get_close_matches(str(name), WRITER_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"WRITERS has an unknown writer {name!r}{hint}; the known writers are {list(WRITER_NAMES)}.")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ValueError(f"WRITERS names {repeated} more than once; each writer writes its own files, so list it once.")


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def check_config_values(cfg: Any) -> None:
    """Raises ``ValueError`` for the first built-in key whose value is out of its range; warns for the values
    that train but are probably a mistake (a zero LR, steps or a warm-up past ``MAX_ITER``).

    Raises ``NotImplementedError`` for ``MODEL.PARALLEL fsdp`` with a setting it does not support yet.
    """
    for key, in_range, words in _RANGES:
        try:
            value = _get(cfg, key)
        except KeyError:
            continue  # a config without this key (a user's own defaults)
        if not in_range(value):
            raise ValueError(f"Config key {key} is {value!r}, out of its range: it must be {words}.")
    if cfg.get("MODEL", {}).get("PARALLEL") == "fsdp":
        _check_fsdp_support(cfg)
    if "WRITERS" in cfg:
        check_writer_names(cfg.WRITERS)
    solver = cfg.SOLVER
    if solver.BASE_LR == 0:
        logger.warning("SOLVER.BASE_LR is 0: the weights will not change.")
    late = [s for s in solver.STEPS if s >= solver.MAX_ITER]
    if late and solver.LR_SCHEDULER_NAME == "WarmupMultiStepLR":
        logger.warning("SOLVER.STEPS %s are not before SOLVER.MAX_ITER (%d): the LR never decays there.", late,
                       solver.MAX_ITER)
    if solver.WARMUP_ITERS > solver.MAX_ITER:
        logger.warning("SOLVER.WARMUP_ITERS (%d) is more than SOLVER.MAX_ITER (%d): training ends during warm-up.",
                       solver.WARMUP_ITERS, solver.MAX_ITER)


def _check_fsdp_support(cfg: Any) -> None:
    # What does not work with MODEL.PARALLEL fsdp yet: refused before anything runs, not mid-run.
    unsupported = []
    if cfg.SOLVER.AMP.ENABLED and cfg.SOLVER.AMP.PRECISION == "float16":
        unsupported.append("SOLVER.AMP.PRECISION float16 (its GradScaler does not handle sharded gradients; use "
                           "bfloat16)")
    if cfg.get("MODEL_EMA") is not None and cfg.MODEL_EMA.get("ENABLED", False):
        unsupported.append("MODEL_EMA.ENABLED (EMA of sharded parameters; set it to False)")
    if cfg.MODEL.get("COMPILE", False):
        unsupported.append("MODEL.COMPILE (FSDP2 wants each block compiled before it is sharded; set it to False)")
    if unsupported:
        raise NotImplementedError(
            "MODEL.PARALLEL fsdp does not support yet: " + "; ".join(unsupported) + ". Change these keys, or use "
            "MODEL.PARALLEL ddp."
        )

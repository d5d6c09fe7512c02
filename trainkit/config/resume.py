"""Resuming with a changed config: what each change does, and the changes that are refused.

A checkpoint holds the config of the run that saved it. :func:`check_resumed_config` compares it with the
config of the resumed run, logs every key that differs (old and new value, and what the change does), and
refuses the changes that make the checkpoint meaningless.
"""
import logging
from typing import Any, Dict, List, Tuple

import yaml

__all__ = ["REFUSED_ON_RESUME", "check_resumed_config", "resume_effect"]

logger = logging.getLogger(__name__)

# The model's architecture and shapes, and the optimizer's type: the saved weights or optimizer state would
# not fit (or would load partly, silently wrong).
REFUSED_ON_RESUME = (
    "MODEL.META_ARCHITECTURE", "MODEL.NUM_CLASSES", "MODEL.MLP.IN_FEATURES", "MODEL.MLP.HIDDEN_DIMS",
    "MODEL.CONVNET.IN_CHANNELS", "MODEL.CONVNET.CHANNELS", "SOLVER.OPTIMIZER",
)

# What a change does on resume, by key prefix (the longest matching prefix wins).
_EFFECTS = {
    "SOLVER.BASE_LR": "no effect: the LR scheduler's base LRs are restored from the checkpoint",
    "SOLVER.BIAS_LR_FACTOR": "no effect: the LR scheduler's base LRs are restored from the checkpoint",
    "SOLVER.MOMENTUM": "no effect: the optimizer's hyperparameters are restored from the checkpoint",
    "SOLVER.NESTEROV": "no effect: the optimizer's hyperparameters are restored from the checkpoint",
    "SOLVER.BETAS": "no effect: the optimizer's hyperparameters are restored from the checkpoint",
    "SOLVER.WEIGHT_DECAY": "no effect: the optimizer's hyperparameters are restored from the checkpoint",
    "SOLVER.IMS_PER_BATCH": "the data order and the step size differ from the interrupted run's from here on",
    "SOLVER.GRAD_ACCUM_STEPS": "the same samples per optimizer step, in other micro-batches: the memory and "
    "the rounding differ, the data order does not",
    "SOLVER.REFERENCE_WORLD_SIZE": "the batch and LR scaling differ from the interrupted run's from here on",
    "SOLVER": "takes effect from the resumed iteration on (the schedule's shape is the new config's; its base "
    "LRs and position are the checkpoint's)",
    "DATASETS": "the training data differ from the interrupted run's from here on",
    "INPUT": "the training data differ from the interrupted run's from here on",
    "DATALOADER.SAMPLER_TRAIN": "the data order differs from the interrupted run's from here on",
    "DATALOADER.NUM_WORKERS": "no effect on the results (the data order does not depend on it)",
    "SEED": "the data order differs from the interrupted run's from here on, unless the checkpoint's data seed "
    "is used (SEED < 0)",
    "MODEL.WEIGHTS": "no effect: resuming loads the checkpoint, not MODEL.WEIGHTS",
    "MODEL.COMPILE": "the same model, compiled or not: the checkpoint loads either way; results differ by rounding",
    "MODEL": "takes effect from the resumed iteration on",
    "MODEL_EMA.ENABLED": "turned on, the average starts from the resumed weights; turned off, the checkpoint's "
    "average is not loaded",
    "MODEL_EMA.DECAY": "takes effect from the resumed iteration on (the average so far is the checkpoint's)",
    "MODEL_EMA.WARMUP_ITERS": "takes effect from the resumed iteration on (the average so far is the checkpoint's)",
    "TEST": "takes effect from the resumed iteration on",
}


def resume_effect(key: str) -> str:
    """What changing ``key`` does when a run is resumed (see the docs' table)."""
    if key in REFUSED_ON_RESUME:
        return "refused: the checkpoint would not fit"
    for prefix in sorted(_EFFECTS, key=len, reverse=True):
        if key == prefix or key.startswith(prefix + "."):
            return _EFFECTS[prefix]
    return "takes effect from the resumed iteration on"


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: Dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return flat


def _differences(saved_yaml: str, current_yaml: str) -> List[Tuple[str, Any, Any]]:
    old, new = _flatten(yaml.safe_load(saved_yaml)), _flatten(yaml.safe_load(current_yaml))
    missing = "<absent>"
    return [
        (key, old.get(key, missing), new.get(key, missing))
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing) and key != "OUTPUT_DIR"
    ]


def check_resumed_config(saved_yaml: str, current_yaml: str, source: str) -> None:
    """Logs each key whose value differs between the checkpoint's config and this run's, with its effect.

    Args:
        saved_yaml: the config saved in the checkpoint (``cfg.dump()``).
        current_yaml: the resumed run's config, the same way.
        source: the checkpoint's path, for the messages.

    Raises:
        ValueError: a key of :data:`REFUSED_ON_RESUME` changed; the message names each such key.
    """
    diffs = _differences(saved_yaml, current_yaml)
    refused = [(k, a, b) for k, a, b in diffs if k in REFUSED_ON_RESUME]
    if refused:
        listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in refused)
        raise ValueError(
            f"the config changed in a way the checkpoint cannot follow ({listed}): the model's architecture and "
            "the optimizer's type must stay as they were. Resume with the checkpoint's values, or start a new run "
            f"in a new OUTPUT_DIR (MODEL.WEIGHTS {source} loads the weights that still fit)."
        )
    for key, old, new in diffs:
        logger.warning("Resuming with a changed config: %s: %r -> %r (%s)", key, old, new, resume_effect(key))

"""The model registry and ``build_model``."""
import logging

import torch
from fvcore.common.registry import Registry

__all__ = ["MODEL_REGISTRY", "build_model"]

logger = logging.getLogger(__name__)

MODEL_REGISTRY = Registry("MODEL")
MODEL_REGISTRY.__doc__ = """
Registry of models, by class name. A registered class is called with the config, ``cls(cfg)``, and returns an
``nn.Module`` whose forward takes a batch and returns a dict of scalar losses in training mode and predictions
in eval mode. Register your own with ``@MODEL_REGISTRY.register()`` and select it with
``MODEL.META_ARCHITECTURE``.
"""


def _device(cfg) -> torch.device:
    name = str(cfg.MODEL.DEVICE)
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"MODEL.DEVICE {name!r} is not a valid torch device (e.g. 'cpu', 'cuda', 'cuda:1').") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"MODEL.DEVICE is {name!r} but CUDA is not available on this machine. "
            "Set MODEL.DEVICE cpu (e.g. append `MODEL.DEVICE cpu` to the command line)."
        )
    return device


def build_model(cfg) -> torch.nn.Module:
    """Builds ``MODEL_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)`` and moves it to ``cfg.MODEL.DEVICE``.

    The device is checked before the model is built, so a config that cannot run fails fast.

    Raises:
        KeyError: the architecture is not registered; the message lists the registered names.
        RuntimeError: ``MODEL.DEVICE`` asks for CUDA on a machine without it.
        ValueError: ``MODEL.DEVICE`` is not a device name.
    """
    device = _device(cfg)
    name = cfg.MODEL.META_ARCHITECTURE
    if name not in MODEL_REGISTRY:
        registered = ", ".join(sorted(n for n, _ in MODEL_REGISTRY))
        raise KeyError(
            f"MODEL.META_ARCHITECTURE {name!r} is not registered. Registered models: {registered}. "
            "Register a model class with @MODEL_REGISTRY.register() (and import its module before building)."
        )
    model = MODEL_REGISTRY.get(name)(cfg)
    model.to(device)
    logger.info("Built model %s on %s with %d parameters", name, device, sum(p.numel() for p in model.parameters()))
    return model

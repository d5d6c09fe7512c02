"""Small built-in classifiers for the digits and synthetic data sets.

Both take a batch dict ``{"image": (B, C, H, W) float tensor, "label": (B,) int64 tensor}`` on any device and
move it to the model's device themselves. Training mode returns ``{"loss_cls": cross-entropy}`` (a scalar
tensor); eval mode returns ``{"logits": (B, NUM_CLASSES)}`` and does not need ``"label"``.
"""
import logging
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .build import MODEL_REGISTRY

__all__ = ["MLPClassifier", "ConvNetClassifier", "ClassifierBase"]

logger = logging.getLogger(__name__)


class ClassifierBase(nn.Module):
    """Shared forward of the built-in classifiers: subclasses implement :meth:`logits`."""

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.parameters()).device

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, ...) images already on the model's device -> (B, num_classes) logits."""
        raise NotImplementedError

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Losses in training mode, logits in eval mode (see the module docstring)."""
        logits = self.logits(batch["image"].to(self.device, non_blocking=True))
        if not self.training:
            return {"logits": logits}
        labels = batch["label"].to(self.device, non_blocking=True)
        return {"loss_cls": F.cross_entropy(logits, labels)}


def _check_dims(dims: List[int], key: str) -> List[int]:
    dims = list(dims)
    if any(int(d) <= 0 for d in dims):
        raise ValueError(f"{key} must hold positive sizes, got {dims}.")
    return dims


@MODEL_REGISTRY.register()
class MLPClassifier(ClassifierBase):
    """Flatten -> (Linear -> ReLU -> Dropout) per ``MODEL.MLP.HIDDEN_DIMS`` -> Linear to ``MODEL.NUM_CLASSES``.

    Inputs must have ``MODEL.MLP.IN_FEATURES`` values per sample (64 for 8x8 digits). Dropout layers are
    left out when ``MODEL.MLP.DROPOUT`` is 0.
    """

    def __init__(self, cfg) -> None:
        super().__init__()
        self.in_features = int(cfg.MODEL.MLP.IN_FEATURES)
        layers: List[nn.Module] = []
        width = self.in_features
        for dim in _check_dims(cfg.MODEL.MLP.HIDDEN_DIMS, "MODEL.MLP.HIDDEN_DIMS"):
            layers += [nn.Linear(width, dim), nn.ReLU(inplace=True)]
            if cfg.MODEL.MLP.DROPOUT > 0:
                layers.append(nn.Dropout(cfg.MODEL.MLP.DROPOUT))
            width = dim
        layers.append(nn.Linear(width, cfg.MODEL.NUM_CLASSES))
        self.layers = nn.Sequential(*layers)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        x = images.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"MLPClassifier expects {self.in_features} input values per sample (MODEL.MLP.IN_FEATURES), "
                f"got images of shape {tuple(images.shape)}. Set MODEL.MLP.IN_FEATURES to {x.shape[1]}."
            )
        return self.layers(x)


@MODEL_REGISTRY.register()
class ConvNetClassifier(ClassifierBase):
    """(3x3 conv, padding 1 -> ReLU) per ``MODEL.CONVNET.CHANNELS`` -> max-pool to 4x4 -> Dropout -> Linear.

    The pooling is ``AdaptiveMaxPool2d(4)``: a 2x2 max-pool for the 8x8 digits, and any input size ends as
    ``CHANNELS[-1] x 4 x 4`` features for the linear head. Dropout (``MODEL.CONVNET.DROPOUT``) is applied to
    those features.
    """

    def __init__(self, cfg) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        channels = int(cfg.MODEL.CONVNET.IN_CHANNELS)
        for out_channels in _check_dims(cfg.MODEL.CONVNET.CHANNELS, "MODEL.CONVNET.CHANNELS"):
            layers += [nn.Conv2d(channels, out_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = out_channels
        layers.append(nn.AdaptiveMaxPool2d(4))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(cfg.MODEL.CONVNET.DROPOUT)
        self.head = nn.Linear(channels * 16, cfg.MODEL.NUM_CLASSES)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images).flatten(1)))

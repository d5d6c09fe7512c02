"""Random augmentation that draws its randomness from an explicit ``torch.Generator``."""
import logging
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .common import get_item

__all__ = ["RandomShift", "shift_image"]

logger = logging.getLogger(__name__)


def shift_image(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translates the last two dimensions of ``image`` by ``(dy, dx)`` pixels, filling with zeros.

    ``out[..., y, x] = image[..., y - dy, x - dx]`` where that is inside the image, else 0; positive ``dy``
    moves the content down, positive ``dx`` to the right.
    """
    if image.dim() < 2:
        raise ValueError(f"shift_image needs an image with >= 2 dims (..., H, W); got shape {tuple(image.shape)}.")
    h, w = image.shape[-2:]
    pad_y, pad_x = abs(dy), abs(dx)
    padded = F.pad(image, (pad_x, pad_x, pad_y, pad_y))
    top, left = pad_y - dy, pad_x - dx
    return padded[..., top : top + h, left : left + w].contiguous()


class RandomShift(Dataset):
    """Shifts each item's ``"image"`` by a random ``(dy, dx)``, each uniform in ``[-max_shift, max_shift]``.

    Implements the ``get(index, generator)`` protocol (see :mod:`trainkit.data.common`): the shift is drawn
    from the given generator, after the wrapped dataset's own draws. Plain ``dataset[i]`` draws from torch's
    global RNG instead; the training loader never does that.

    Args:
        dataset: a map-style dataset whose items are dicts with an ``"image"`` tensor of shape (..., H, W).
        max_shift: the largest shift in pixels (>= 0; 0 returns the images unchanged).
    """

    def __init__(self, dataset: Dataset, max_shift: int) -> None:
        if max_shift < 0:
            raise ValueError(f"RandomShift(max_shift={max_shift}): max_shift must be >= 0 (INPUT.AUGMENT.MAX_SHIFT).")
        self.dataset = dataset
        self.max_shift = int(max_shift)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.get(index, None)

    def get(self, index: int, generator: Optional[torch.Generator]) -> Dict[str, Any]:
        """Item ``index`` with its image shifted by an amount drawn from ``generator``."""
        item = get_item(self.dataset, index, generator)
        if not isinstance(item, dict) or "image" not in item:
            raise TypeError(
                f"RandomShift needs dict items with an 'image' key; item {index} is {type(item).__name__}"
                f"{' with keys ' + str(sorted(item)) if isinstance(item, dict) else ''}. "
                "Disable INPUT.AUGMENT.ENABLED or augment inside your dataset."
            )
        m = self.max_shift
        dy, dx = torch.randint(-m, m + 1, (2,), generator=generator).tolist()
        return {**item, "image": shift_image(item["image"], dy, dx)}

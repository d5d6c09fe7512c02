"""Top-k accuracy of a classifier."""
import logging
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from ..utils import comm
from .evaluator import DatasetEvaluator

__all__ = ["ClassificationEvaluator"]

logger = logging.getLogger(__name__)


class ClassificationEvaluator(DatasetEvaluator):
    """Top-k accuracy, in percent, of ``outputs["logits"]`` against ``inputs["label"]``.

    Only counts are kept: per ``k``, the number of samples whose label is among the ``k`` highest logits,
    accumulated on the logits' device (no host synchronisation in :meth:`process`). :meth:`evaluate` gathers the
    counts of all processes to the main process, which returns ``{"classification": {"top1": .., "top5": ..}}``;
    other processes return ``{}``. With ``InferenceSampler`` every sample is counted exactly once. When ``k`` is
    at least the number of classes, top-k is 100%. Ties between logits are broken by ``torch.topk``.

    Args:
        dataset_name: used in log messages only.
        topk: the ``k`` values to report.
        distributed: gather over processes; False evaluates this process's samples alone.
    """

    def __init__(self, dataset_name: Optional[str] = None, topk: Sequence[int] = (1, 5), distributed: bool = True):
        topk = tuple(int(k) for k in topk)
        if not topk or any(k <= 0 for k in topk):
            raise ValueError(f"ClassificationEvaluator(topk={topk}): give one or more positive k, e.g. (1, 5).")
        self._dataset_name = dataset_name
        self._topk = topk
        self._distributed = distributed
        self.reset()

    @property
    def num_samples(self) -> int:
        """Samples processed by this process since the last :meth:`reset`."""
        return self._num_samples

    def reset(self) -> None:
        self._num_samples = 0
        self._correct: Optional[torch.Tensor] = None

    def process(self, inputs: Mapping[str, Any], outputs: Mapping[str, torch.Tensor]) -> None:
        """Counts the correct predictions of one batch: ``inputs["label"]`` (B,), ``outputs["logits"]`` (B, C)."""
        logits = outputs["logits"]
        labels = inputs["label"].to(logits.device, non_blocking=True)
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"ClassificationEvaluator needs logits of shape (B, C) and labels of shape (B,); got logits "
                f"{tuple(logits.shape)} and labels {tuple(labels.shape)}."
            )
        num_classes = logits.shape[1]
        ranked = logits.topk(min(max(self._topk), num_classes), dim=1).indices
        hits = ranked == labels[:, None]
        correct = torch.stack([hits[:, : min(k, num_classes)].any(dim=1).sum() for k in self._topk])
        self._correct = correct if self._correct is None else self._correct + correct
        self._num_samples += labels.shape[0]

    def evaluate(self) -> Dict[str, Any]:
        correct = [0] * len(self._topk) if self._correct is None else self._correct.tolist()
        counts = [(self._num_samples, correct)]
        if self._distributed:
            counts = comm.gather(counts[0], dst=0)
            if not comm.is_main_process():
                return {}
        total = sum(n for n, _ in counts)
        name = f" on {self._dataset_name}" if self._dataset_name else ""
        if total == 0:
            logger.warning("ClassificationEvaluator%s got no samples; returning no results.", name)
            return {}
        correct = [sum(c[i] for _, c in counts) for i in range(len(self._topk))]
        metrics = {f"top{k}": 100.0 * c / total for k, c in zip(self._topk, correct)}
        logger.info("Classification%s over %d samples: %s", name, total, metrics)
        return {"classification": metrics}

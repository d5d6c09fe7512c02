"""Result formatting helpers."""
import logging
from typing import Any, Dict, Mapping

__all__ = ["print_csv_format", "flatten_results_dict"]

logger = logging.getLogger(__name__)


def print_csv_format(results: Mapping[str, Any]) -> None:
    """Logs the results of each task as two copy-pasteable CSV lines (names, then values).

    Args:
        results: ``{task: {metric: number}}`` as returned by an evaluator. Metric names containing ``-``
            (per-class details, by detectron2's convention) are left out. A task whose value is not a dict is
            logged as ``task=value``.

    Example log lines::

        copypaste: Task: classification
        copypaste: top1,top5
        copypaste: 97.2222,100.0000
    """
    for task, res in results.items():
        if isinstance(res, Mapping):
            important = [(k, v) for k, v in res.items() if "-" not in k]
            logger.info("copypaste: Task: %s", task)
            logger.info("copypaste: %s", ",".join(k for k, _ in important))
            logger.info("copypaste: %s", ",".join(f"{v:.4f}" for _, v in important))
        else:
            logger.info("copypaste: %s=%s", task, res)


def flatten_results_dict(results: Mapping[str, Any]) -> Dict[str, Any]:
    """Flattens nested dicts into ``{"task/metric": value}`` (e.g. for ``EventStorage.put_scalars``)."""
    flat: Dict[str, Any] = {}
    for key, value in results.items():
        if isinstance(value, Mapping):
            for inner_key, inner_value in flatten_results_dict(value).items():
                flat[f"{key}/{inner_key}"] = inner_value
        else:
            flat[key] = value
    return flat

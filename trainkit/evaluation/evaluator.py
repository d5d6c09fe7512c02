"""The evaluator protocol and the inference loop that feeds it."""
import contextlib
import datetime
import logging
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from ..utils import comm

__all__ = ["DatasetEvaluator", "DatasetEvaluators", "inference_on_dataset", "inference_context"]

logger = logging.getLogger(__name__)


class DatasetEvaluator:
    """Accumulates a metric over a data set, batch by batch.

    ``inference_on_dataset`` calls :meth:`reset` once, :meth:`process` for every batch, then :meth:`evaluate`.
    Under several processes each process sees its own shard; :meth:`evaluate` gathers to the main process.
    Keep :meth:`process` cheap and free of host synchronisation (accumulate on the device): it runs in the
    inference loop.
    """

    def reset(self) -> None:
        """Clears the state before a new evaluation."""

    def process(self, inputs: Any, outputs: Any) -> None:
        """Accumulates one batch: ``inputs`` is what the loader gave the model, ``outputs`` what it returned."""

    def evaluate(self) -> Optional[Dict[str, Any]]:
        """The results, e.g. ``{"classification": {"top1": 97.5}}``: task name -> {metric name -> number}.

        Under several processes the main process returns the results; the others may return ``{}``.
        """
        return None


class DatasetEvaluators(DatasetEvaluator):
    """Several evaluators run as one; their result dicts are merged (a key produced twice is an error)."""

    def __init__(self, evaluators: Sequence[DatasetEvaluator]) -> None:
        super().__init__()
        self._evaluators = list(evaluators)

    def reset(self) -> None:
        for evaluator in self._evaluators:
            evaluator.reset()

    def process(self, inputs: Any, outputs: Any) -> None:
        for evaluator in self._evaluators:
            evaluator.process(inputs, outputs)

    def evaluate(self) -> Dict[str, Any]:
        results: Dict[str, Any] = {}
        for evaluator in self._evaluators:
            result = evaluator.evaluate()
            if not result or not comm.is_main_process():
                continue
            for key, value in result.items():
                if key in results:
                    raise KeyError(
                        f"Two evaluators produced the result key {key!r} ({type(evaluator).__name__} is the "
                        "second). Give each evaluator's results a distinct task name."
                    )
                results[key] = value
        return results


@contextlib.contextmanager
def inference_context(model: nn.Module) -> Iterator[None]:
    """Puts ``model`` in eval mode for the block, then restores every submodule's own mode.

    Restoring per submodule (not ``model.train(previous)``) keeps deliberate mixes intact, e.g. a frozen
    BatchNorm left in eval mode inside a training model. Restored in ``finally``, also when the block raises.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _num_batches(data_loader: Iterable) -> Optional[int]:
    try:
        return len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        return None


class _Timer:
    """Time spent loading, computing and evaluating, excluding the first ``warmup`` batches."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.data = self.compute = self.evaluate = 0.0
        self.start = time.perf_counter()

    def maybe_restart(self, idx: int) -> None:
        if idx == self.warmup:
            self.data = self.compute = self.evaluate = 0.0
            self.start = time.perf_counter()

    def counted(self, idx: int) -> int:
        return idx + 1 - (self.warmup if idx >= self.warmup else 0)


def _log_progress(idx: int, total: Optional[int], timer: _Timer) -> None:
    counted = timer.counted(idx)
    per_batch = (time.perf_counter() - timer.start) / counted
    eta = ""
    if total is not None:
        eta = f" ETA={datetime.timedelta(seconds=int(per_batch * (total - idx - 1)))}."
    logger.info(
        "Inference done %d/%s. Data: %.4f s/batch. Inference: %.4f s/batch. Eval: %.4f s/batch. Total: %.4f s/batch.%s",
        idx + 1, total if total is not None else "?", timer.data / counted, timer.compute / counted,
        timer.evaluate / counted, per_batch, eta,
    )


def inference_on_dataset(
    model: Union[nn.Module, Any],
    data_loader: Iterable,
    evaluator: Union[DatasetEvaluator, List[DatasetEvaluator], None],
    log_period: float = 5.0,
) -> Dict[str, Any]:
    """Runs ``model`` on every batch of ``data_loader`` and feeds ``evaluator``; returns its results.

    The model runs under :func:`inference_context` (eval mode, restored afterwards) and ``torch.no_grad()``.
    Progress with an ETA is logged at most every ``log_period`` seconds; total and per-batch times are logged
    at the end (the first few batches are excluded from the per-batch average as warm-up).

    Args:
        model: called as ``model(batch)``; an ``nn.Module`` is put in eval mode for the duration.
        data_loader: a finite iterable of batches, e.g. from ``build_test_loader``.
        evaluator: one evaluator, a list of them, or None (then only timing is done and ``{}`` is returned).
        log_period: seconds between progress messages.

    Returns:
        the evaluator's results on the main process (``{}`` when it returns None, and usually on other ranks).
    """
    if evaluator is None:
        evaluator = DatasetEvaluators([])
    elif isinstance(evaluator, (list, tuple)):
        evaluator = DatasetEvaluators(evaluator)
    total = _num_batches(data_loader)
    logger.info("Start inference on %s batches", total if total is not None else "an unknown number of")
    evaluator.reset()
    begin = time.perf_counter()
    timer = _Timer(warmup=min(5, total - 1) if total else 0)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    num_batches = 0
    last_log = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if isinstance(model, nn.Module):
            stack.enter_context(inference_context(model))
        stack.enter_context(torch.no_grad())
        data_start = time.perf_counter()
        for idx, inputs in enumerate(data_loader):
            timer.data += time.perf_counter() - data_start
            timer.maybe_restart(idx)
            compute_start = time.perf_counter()
            outputs = model(inputs)
            sync()
            eval_start = time.perf_counter()
            timer.compute += eval_start - compute_start
            evaluator.process(inputs, outputs)
            timer.evaluate += time.perf_counter() - eval_start
            num_batches = idx + 1
            if time.perf_counter() - last_log >= log_period:
                _log_progress(idx, total, timer)
                last_log = time.perf_counter()
            data_start = time.perf_counter()
    _log_totals(time.perf_counter() - begin, num_batches, timer)
    results = evaluator.evaluate()
    return {} if results is None else results


def _log_totals(wall: float, num_batches: int, timer: _Timer) -> None:
    counted = max(timer.counted(num_batches - 1), 1)
    per_batch = (time.perf_counter() - timer.start) / counted
    logger.info(
        "Total inference time: %s for %d batches (%.6f s / batch per process after warm-up, of which compute "
        "%.6f s; on %d processes)",
        datetime.timedelta(seconds=round(wall, 3)), num_batches, per_batch, timer.compute / counted,
        comm.get_world_size(),
    )

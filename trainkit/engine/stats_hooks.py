"""Hooks that measure or recompute statistics of the run: memory use and BatchNorm statistics.

Both are re-exported from :mod:`trainkit.engine.hooks`, so ``hooks.TorchMemoryStats`` and ``hooks.PreciseBN``
are used as in detectron2.
"""
import logging
import resource
import sys
from typing import Any, Iterable, Iterator, List, Optional

import torch
from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats
from torch import nn

from trainkit.engine.train_loop import HookBase
from trainkit.utils.env import preserve_rng_state
from trainkit.utils.periods import period_fires

__all__ = ["TorchMemoryStats", "PreciseBN"]

logger = logging.getLogger(__name__)

_MB = 1024.0 * 1024.0


def peak_rss_mb() -> float:
    """The peak resident memory of this process so far, in MB (``resource.getrusage``'s ``ru_maxrss``)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return rss / _MB if sys.platform == "darwin" else rss / 1024.0


class TorchMemoryStats(HookBase):
    """Puts the peak memory of the last ``period`` iterations into the storage (detectron2's hook logs it).

    Every ``period`` iterations and after the last one:

    - with CUDA in use in this process (``torch.cuda.is_initialized()``): ``memory/max_allocated_mb`` and
      ``memory/max_reserved_mb``, the peaks of ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``
      on the current device since the previous put; then the peaks are reset, so each value is the peak of
      its own period. (The console's ``max_mem`` reads the same peak, so it too becomes per period.)
    - otherwise: ``memory/max_rss_mb``, the process's peak resident memory since it started. The operating
      system cannot reset that peak, so the CPU curve only rises: a step up shows when memory grew.

    It is cheap (a few calls into the allocator, or one ``getrusage``, once per period), so DefaultTrainer
    registers it with ``period=SOLVER.LOG_PERIOD``: the values are on every metrics line. Each process puts its
    own values; the writers (main process) write the main process's.

    Args:
        period: iterations between puts; match the writers' period.
        max_runs: stop after this many puts (None: never; detectron2's default, 10, suits a hook that logs).
    """

    def __init__(self, period: int = 20, max_runs: Optional[int] = None) -> None:
        if not isinstance(period, int) or period < 1:
            raise ValueError(f"TorchMemoryStats period must be an int >= 1 (iterations), got {period!r}.")
        if max_runs is not None and (not isinstance(max_runs, int) or max_runs < 1):
            raise ValueError(f"TorchMemoryStats max_runs must be None or an int >= 1, got {max_runs!r}.")
        self._period = period
        self._max_runs = max_runs
        self._runs = 0

    def after_step(self) -> None:
        if self._max_runs is not None and self._runs >= self._max_runs:
            return
        if not period_fires(self._period, self.trainer.iter, self.trainer.max_iter):
            return
        self._runs += 1
        storage = self.trainer.storage
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            storage.put_scalars(
                **{
                    "memory/max_allocated_mb": torch.cuda.max_memory_allocated() / _MB,
                    "memory/max_reserved_mb": torch.cuda.max_memory_reserved() / _MB,
                },
                smoothing_hint=False,
            )
            torch.cuda.reset_peak_memory_stats()
        else:
            storage.put_scalar("memory/max_rss_mb", peak_rss_mb(), smoothing_hint=False)


def _batches(data_loader: Iterable[Any], num_iter: int) -> Iterator[Any]:
    # A fresh iterator each run: its batches depend only on the loader, not on earlier runs.
    iterator = iter(data_loader)
    for i in range(num_iter):
        try:
            yield next(iterator)
        except StopIteration:
            raise ValueError(
                f"PreciseBN needs {num_iter} batches but the data loader ended after {i}: lower num_iter "
                "(TEST.PRECISE_BN.NUM_ITER) or give a longer (e.g. the infinite training) loader."
            ) from None


def update_bn_stats_in_place(model: nn.Module, data_loader: Iterable[Any], num_iter: int) -> None:
    """fvcore's ``update_bn_stats``, with the new statistics written into the BatchNorm layers' own buffers.

    fvcore assigns new tensors to ``running_mean`` / ``running_var``; whatever holds the old ones (the buffer
    list of a DistributedDataParallel that broadcasts buffers, a compiled graph) would keep stale values. So the
    results are copied into the original tensors, which are put back.
    """
    layers = get_bn_modules(model)
    originals = [(bn, bn.running_mean, bn.running_var) for bn in layers]
    update_bn_stats(model, _batches(data_loader, num_iter), num_iter)
    with torch.no_grad():
        for bn, mean, var in originals:
            mean.copy_(bn.running_mean)
            var.copy_(bn.running_var)
            bn.running_mean, bn.running_var = mean, var


class PreciseBN(HookBase):
    """Recomputes the BatchNorm statistics of ``model`` over ``num_iter`` batches, every ``period`` iterations
    and after the last one (detectron2's hook), with fvcore's ``update_bn_stats``.

    During training the running statistics average over batches seen with weights that kept changing; just
    before an evaluation this recomputes them with the weights fixed: the mean of each BN layer's input over
    all ``num_iter`` batches, and their variance (fvcore's population estimator, which divides by the total
    number of values N, not N - 1; see "Rethinking Batch in BatchNorm", appendix). Register it before the
    EvalHook so that the evaluation of the same iteration uses them (DefaultTrainer does).

    Each run takes a fresh iterator of ``data_loader`` (so, with a trainkit training loader, the stream's first
    ``num_iter`` batches): a resumed run recomputes exactly what the interrupted one did, with no loader state
    to save. Pass a loader of its own, not the trainer's (whose stream would then skip batches). The forwards
    run with the global RNG states saved and restored, so dropout or augmentation in them does not change the
    randomness of training. With several processes each computes the statistics of its own batches.

    A no-op (the loader is never read) for a model without BatchNorm layers in training mode.

    Args:
        period: iterations between recomputations (0: only after the last iteration).
        model: the model; its BatchNorm layers must be in training mode (they are during training).
        data_loader: gives the model's input batches; must give at least ``num_iter``.
        num_iter: batches to compute the statistics over.
    """

    def __init__(self, period: int, model: nn.Module, data_loader: Iterable[Any], num_iter: int) -> None:
        if not isinstance(num_iter, int) or num_iter < 1:
            raise ValueError(f"PreciseBN num_iter must be an int >= 1 (batches), got {num_iter!r}.")
        if not isinstance(period, int) or period < 0:
            raise ValueError(
                f"PreciseBN period must be an int >= 0 (0: only after the last iteration), got {period!r}."
            )
        length = _len_or_none(data_loader)
        if length is not None and length < num_iter:
            raise ValueError(
                f"PreciseBN needs {num_iter} batches but the data loader has {length}: lower num_iter "
                "(TEST.PRECISE_BN.NUM_ITER) or give a longer (e.g. the infinite training) loader."
            )
        self._period = period
        self._model = model
        self._data_loader = data_loader
        self._num_iter = num_iter
        self._disabled = len(get_bn_modules(model)) == 0
        if self._disabled:
            logger.info("PreciseBN is disabled: the model has no BatchNorm layer in training mode.")

    def after_step(self) -> None:
        if period_fires(self._period, self.trainer.iter, self.trainer.max_iter):
            self.update_stats()

    def update_stats(self) -> None:
        """Recomputes the statistics now (what the hook does at its iterations)."""
        if self._disabled:
            return
        layers: List[nn.Module] = get_bn_modules(self._model)
        logger.info("Running PreciseBN: %d BatchNorm layers over %d batches ...", len(layers), self._num_iter)
        with preserve_rng_state():
            update_bn_stats_in_place(self._model, self._data_loader, self._num_iter)


def _len_or_none(data_loader: Any) -> Optional[int]:
    # An infinite DataLoader (trainkit's training loader: its sampler has no __len__) raises TypeError on len().
    try:
        return len(data_loader)
    except TypeError:
        return None

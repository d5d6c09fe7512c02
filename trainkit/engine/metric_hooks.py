"""Hooks that act on an evaluation metric: keep the best model, stop when it stops improving.

Register them after the :class:`~trainkit.engine.hooks.EvalHook` whose results they read, with the same
period. Both are exported from :mod:`trainkit.engine.hooks`.
"""
import logging
import math
from typing import Any, Dict, Optional

from trainkit.engine.train_loop import HookBase

__all__ = ["BestCheckpointer", "EarlyStopping"]

logger = logging.getLogger(__name__)


def _improves(value: float, best: Optional[float], mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (always, when there is no best yet)."""
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


class _EvalMetricHook(HookBase):
    """Base of the hooks that follow one evaluation metric and remember its best value.

    The metric is read from the storage only at the iterations where an :class:`EvalHook` with the same period
    evaluates, so the hot loop stays free of storage reads (which would force pending device tensors to the
    host). A value counts only if it was put at the current iteration, i.e. by that evaluation. Under several
    processes every process reads its own storage, where the EvalHook put the main process's results, so all
    processes take the same decisions (saving and stopping are things they must do together).
    """

    def __init__(self, eval_period: int, val_metric: str, mode: str) -> None:
        hook = type(self).__name__
        if mode not in ("max", "min"):
            raise ValueError(
                f"{hook} mode must be 'max' (higher is better) or 'min' (lower is better), got {mode!r}."
            )
        if not isinstance(eval_period, int) or eval_period < 0:
            raise ValueError(
                f"{hook} eval_period must be the EvalHook's period (an int >= 0, e.g. cfg.TEST.EVAL_PERIOD), "
                f"got {eval_period!r}."
            )
        self._eval_period = eval_period
        self._val_metric = val_metric
        self._mode = mode
        self._warned_missing = False
        self.best_metric: Optional[float] = None
        self.best_iter: Optional[int] = None

    def _evaluated_now(self) -> bool:
        # Whether the EvalHook evaluated in this iteration's after_step.
        next_iter = self.trainer.iter + 1
        return (self._eval_period > 0 and next_iter % self._eval_period == 0) or next_iter == self.trainer.max_iter

    def _evaluated_in_after_train(self) -> bool:
        # A resumed run with no iteration left: the EvalHook evaluates the final model in after_train.
        return self.trainer.iter == self.trainer.max_iter and self.trainer.start_iter >= self.trainer.max_iter

    def _fresh_value(self) -> Optional[float]:
        """The metric's value if it was put at the current iteration, else None (warns once if it is unknown)."""
        latest = self.trainer.storage.latest()
        if self._val_metric not in latest:
            if not self._warned_missing:
                self._warned_missing = True
                logger.warning(
                    "%s: no metric %r in the storage after the evaluation at iteration %d; available: %s. Check the "
                    "name (the flattened result, such as 'classification/top1') and register this hook after the "
                    "EvalHook, with the same eval_period.",
                    type(self).__name__, self._val_metric, self.trainer.iter, sorted(latest),
                )
            return None
        value, iteration = latest[self._val_metric]
        return value if iteration == self.trainer.iter else None

    def state_dict(self) -> Dict[str, Any]:
        return {
            "val_metric": self._val_metric,
            "mode": self._mode,
            "best_metric": self.best_metric,
            "best_iter": self.best_iter,
        }

    def _load_best(self, state_dict: Dict[str, Any]) -> bool:
        """Restores the best value unless the state follows another metric or mode; returns whether it did."""
        saved = (state_dict.get("val_metric"), state_dict.get("mode"))
        if saved != (self._val_metric, self._mode):
            logger.warning(
                "%s: the checkpoint's state follows %r (mode %s), this hook follows %r (mode %s); its state is not "
                "loaded and the best value starts afresh.",
                type(self).__name__, saved[0], saved[1], self._val_metric, self._mode,
            )
            return False
        self.best_metric, self.best_iter = state_dict["best_metric"], state_dict["best_iter"]
        return True


class BestCheckpointer(_EvalMetricHook):
    """Saves the model with the best evaluation result so far as ``{file_prefix}.pth``.

    After each evaluation (every ``eval_period`` iterations and after the last iteration) it reads
    ``val_metric`` from the storage; when the value is strictly better than every earlier one, it saves a
    checkpoint with the extra data ``iteration``, ``val_metric`` (the name) and ``val_metric_value``.
    Register it after the :class:`EvalHook`, with the same period: it reads what that hook put in the same
    iteration (``DefaultTrainer.register_hooks`` appends it after the default EvalHook). A NaN or infinite
    value is never the best; a misspelt metric name gives one warning listing the available ones.

    The file does not move the ``last_checkpoint`` tag, so ``--resume`` continues from the latest checkpoint,
    not from the best one. The best value and its iteration are in the hook's state (saved with the trainer's),
    so a resumed run replaces the file only with a better model.

    Args:
        eval_period: the EvalHook's period (``cfg.TEST.EVAL_PERIOD``); 0: only after the last iteration.
        checkpointer: saves the file, e.g. ``DefaultTrainer.checkpointer``. The hook calls it on every process
            (collecting the state may be a collective); only the checkpointer of the main process writes.
        val_metric: the metric's name in the storage, e.g. ``"classification/top1"``.
        mode: ``"max"`` when higher is better, ``"min"`` when lower is better.
        file_prefix: the file name without ``.pth``.
    """

    def __init__(
        self, eval_period: int, checkpointer: Any, val_metric: str, mode: str = "max", file_prefix: str = "model_best"
    ) -> None:
        super().__init__(eval_period, val_metric, mode)
        self._checkpointer = checkpointer
        self._file_prefix = file_prefix

    def after_step(self) -> None:
        if self._evaluated_now():
            self._save_if_best(self.trainer.iter)

    def after_train(self) -> None:
        if self._evaluated_in_after_train():
            self._save_if_best(self.trainer.max_iter - 1)  # the final model is that of the last iteration

    def _save_if_best(self, iteration: int) -> None:
        value = self._fresh_value()
        if value is None:
            return
        name, best, best_iter = self._val_metric, self.best_metric, self.best_iter
        if not math.isfinite(value):
            logger.warning(
                "BestCheckpointer: %s = %s at iteration %d is not a finite number; not saved.", name, value, iteration
            )
            return
        if not _improves(value, best, self._mode):
            logger.info(
                "BestCheckpointer: %s = %.5g at iteration %d is not better than the best, %.5g at iteration %d; "
                "not saved.", name, value, iteration, best, best_iter,
            )
            return
        self.best_metric, self.best_iter = value, iteration  # before saving: the file holds the hook's new state
        # tag=False: --resume must continue from the latest checkpoint, not from this one.
        self._checkpointer.save(
            self._file_prefix, tag=False, iteration=iteration, val_metric=name, val_metric_value=value
        )
        if best is None:
            logger.info(
                "BestCheckpointer: saved %s.pth with %s = %.5g at iteration %d.",
                self._file_prefix, name, value, iteration,
            )
        else:
            logger.info(
                "BestCheckpointer: %s improved from %.5g (iteration %d) to %.5g at iteration %d; saved %s.pth.",
                name, best, best_iter, value, iteration, self._file_prefix,
            )

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if self._load_best(state_dict) and self.best_iter is not None:
            logger.info(
                "BestCheckpointer: best %s so far is %.5g at iteration %d.", self._val_metric, self.best_metric,
                self.best_iter,
            )


class EarlyStopping(_EvalMetricHook):
    """Stops training when an evaluation metric has stopped improving.

    After each evaluation it reads ``val_metric`` from the storage, like :class:`BestCheckpointer` (register it
    after the :class:`EvalHook`, with the same period). A value better than the best so far by more than
    ``min_delta`` is an improvement; any other value, NaN included, counts as an evaluation without one. After
    ``patience`` evaluations in a row without improvement it calls ``trainer.request_stop``: the remaining
    hooks of that iteration run, then ``after_train`` (the writers write what is left). It does not stop at
    the last iteration, where training ends anyway.

    Stopping saves no checkpoint, and a stopped run has no ``model_final``: use a :class:`BestCheckpointer`
    to keep the best model. The best value and the count are in the hook's state, saved with the trainer's.

    Args:
        val_metric: the metric's name in the storage, e.g. ``"classification/top1"``.
        patience: evaluations without improvement after which training stops (>= 1).
        mode: ``"max"`` when higher is better, ``"min"`` when lower is better.
        min_delta: how much a value must beat the best by to count as an improvement (>= 0).
        eval_period: the EvalHook's period (``cfg.TEST.EVAL_PERIOD``); 0: only after the last iteration.
    """

    def __init__(
        self, val_metric: str, patience: int, mode: str = "max", min_delta: float = 0.0, *, eval_period: int
    ) -> None:
        super().__init__(eval_period, val_metric, mode)
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStopping patience must be a number of evaluations >= 1, got {patience!r}.")
        if not min_delta >= 0:
            raise ValueError(f"EarlyStopping min_delta must be >= 0 (an improvement margin), got {min_delta!r}.")
        self._patience = patience
        self._min_delta = float(min_delta)
        self.num_bad_evals = 0

    def after_step(self) -> None:
        if not self._evaluated_now():
            return
        value = self._fresh_value()
        if value is None:
            return
        it = self.trainer.iter
        if math.isfinite(value) and _improves(value, self.best_metric, self._mode, self._min_delta):
            self.best_metric, self.best_iter, self.num_bad_evals = value, it, 0
            return
        self.num_bad_evals += 1
        best = "none" if self.best_metric is None else f"{self.best_metric:.5g} at iteration {self.best_iter}"
        logger.info(
            "EarlyStopping: %s = %.5g at iteration %d is no improvement of more than %g over the best (%s); "
            "%d of %d evaluations without improvement.",
            self._val_metric, value, it, self._min_delta, best, self.num_bad_evals, self._patience,
        )
        # Not at the last iteration (training ends anyway), nor when another hook already stopped it.
        last = it >= self.trainer.max_iter - 1
        if self.num_bad_evals >= self._patience and not last and self.trainer.stop_reason is None:
            evals = f"{self.num_bad_evals} evaluation{'s' if self.num_bad_evals > 1 else ''}"
            reason = (
                f"early stopping: {self._val_metric} did not improve by more than {self._min_delta:g} in {evals} "
                f"(best: {best})"
            )
            logger.info("EarlyStopping: stopping after iteration %d: %s.", it, reason)
            self.trainer.request_stop(reason)

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "num_bad_evals": self.num_bad_evals}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if self._load_best(state_dict):
            self.num_bad_evals = state_dict["num_bad_evals"]

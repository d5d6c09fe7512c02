"""Hooks that act on an evaluation metric: keep the best model, stop when it stops improving.

Register them after the :class:`~trainkit.engine.hooks.EvalHook` whose results they read. They learn when
it evaluated from the storage: a value of their metric put in the current iteration. Both are exported from
:mod:`trainkit.engine.hooks`.
"""
import logging
import math
import warnings
from typing import Any, Dict, Optional

from trainkit.engine.train_loop import HookBase
from trainkit.utils.periods import period_fires

__all__ = ["BestCheckpointer", "EarlyStopping"]

logger = logging.getLogger(__name__)


def _improves(value: float, best: Optional[float], mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (always, when there is no best yet)."""
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


class _EvalMetricHook(HookBase):
    """Base of the hooks that follow one evaluation metric and remember its best value.

    An evaluation is a value of the metric put in the current iteration (by an :class:`EvalHook` registered
    before this hook), read with :meth:`EventStorage.latest_value`, which costs no host transfer for a number.
    A value put after this hook ran (by an EvalHook registered after it) is never acted on, with a warning.
    Under several processes every process reads its own storage, where the EvalHook put the main process's
    results, so all processes take the same decisions (saving and stopping are things they must do together).
    """

    def __init__(self, val_metric: str, mode: str, eval_period: Optional[int]) -> None:
        hook = type(self).__name__
        if mode not in ("max", "min"):
            raise ValueError(
                f"{hook} mode must be 'max' (higher is better) or 'min' (lower is better), got {mode!r}."
            )
        if eval_period is not None:
            if not isinstance(eval_period, int) or eval_period < 0:
                raise ValueError(
                    f"{hook} eval_period must be the EvalHook's period (an int >= 0, e.g. cfg.TEST.EVAL_PERIOD), "
                    f"got {eval_period!r}."
                )
            warnings.warn(
                f"{hook}(eval_period=...) is deprecated and no longer needed: the hook acts on each new value of "
                f"{val_metric!r} in the storage. Leave eval_period out.",
                DeprecationWarning,
                stacklevel=3,
            )
        self._eval_period = eval_period  # only used to warn at an evaluation that lacks the metric
        self._val_metric = val_metric
        self._mode = mode
        self._warned = False
        self._seen_iter = -1  # the iteration of the newest value of the metric this hook has looked at
        self.best_metric: Optional[float] = None
        self.best_iter: Optional[int] = None

    def before_train(self) -> None:
        # A value restored from the checkpoint's storage was acted on by the interrupted run.
        latest = self.trainer.storage.latest_value(self._val_metric)
        self._seen_iter = -1 if latest is None else latest[1]

    def _fresh_value(self) -> Optional[float]:
        """The metric's value if it was put in the current iteration and not looked at before, else None."""
        latest = self.trainer.storage.latest_value(self._val_metric)
        it = self.trainer.iter
        if latest is None or latest[1] <= self._seen_iter:
            if self._eval_period is not None and period_fires(self._eval_period, it, self.trainer.max_iter):
                missing = "no metric" if latest is None else "no new value of"
                self._warn_once(f"{missing} {self._val_metric!r} in the storage after the evaluation at iteration {it}")
            return None
        value, self._seen_iter = latest
        if self._seen_iter != it:
            self._warn_once(f"the value of {self._val_metric!r} put at iteration {self._seen_iter} came after it ran")
            return None
        return value

    def _warn_once(self, what: str) -> None:
        if self._warned:
            return
        self._warned = True
        logger.warning(
            "%s: %s; available: %s. Check the name (the flattened result, such as 'classification/top1') and "
            "register this hook after the EvalHook.",
            type(self).__name__, what, sorted(self.trainer.storage.latest()),
        )

    def after_train(self) -> None:
        if self.trainer.iter == self.trainer.max_iter and self.best_iter is None and self._seen_iter < 0:
            self._warn_once(f"no value of {self._val_metric!r} was put during training")

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

    After each evaluation (a value of ``val_metric`` put in the current iteration) it reads the value; when it
    is strictly better than every earlier one, it saves a checkpoint with the extra data ``iteration``,
    ``val_metric`` (the name) and ``val_metric_value``. Register it after the :class:`EvalHook`: it reads what
    that hook put in the same iteration (``DefaultTrainer.register_hooks`` appends it after the default
    EvalHook). A NaN or infinite
    value is never the best; a misspelt metric name gives one warning listing the available ones.

    The file does not move the ``last_checkpoint`` tag, so ``--resume`` continues from the latest checkpoint,
    not from the best one. The best value and its iteration are in the hook's state (saved with the trainer's),
    so a resumed run replaces the file only with a better model.

    Args:
        eval_period: deprecated and not needed (the detectron2 form ``BestCheckpointer(eval_period, checkpointer,
            val_metric)`` still works, with a ``DeprecationWarning``); give the other arguments by keyword.
        checkpointer: saves the file, e.g. ``DefaultTrainer.checkpointer``. The hook calls it on every process
            (collecting the state may be a collective); only the checkpointer of the main process writes.
        val_metric: the metric's name in the storage, e.g. ``"classification/top1"``.
        mode: ``"max"`` when higher is better, ``"min"`` when lower is better.
        file_prefix: the file name without ``.pth``.
    """

    def __init__(
        self,
        eval_period: Optional[int] = None,
        checkpointer: Any = None,
        val_metric: Optional[str] = None,
        mode: str = "max",
        file_prefix: str = "model_best",
    ) -> None:
        if checkpointer is None or val_metric is None:
            raise TypeError(
                "BestCheckpointer needs a checkpointer and a metric: "
                "BestCheckpointer(checkpointer=trainer.checkpointer, val_metric='classification/top1')."
            )
        super().__init__(val_metric, mode, eval_period)
        self._checkpointer = checkpointer
        self._file_prefix = file_prefix

    def after_step(self) -> None:
        value = self._fresh_value()
        if value is not None:
            self._save_if_best(value, self.trainer.iter)

    def after_train(self) -> None:
        # A resumed run with no iteration left: the EvalHook evaluated the final model in its after_train.
        value = self._fresh_value() if self.trainer.iter == self.trainer.max_iter else None
        if value is not None:
            self._save_if_best(value, self.trainer.max_iter - 1)  # the final model is that of the last iteration
        super().after_train()

    def _save_if_best(self, value: float, iteration: int) -> None:
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
    after the :class:`EvalHook`). A value better than the best so far by more than
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
        eval_period: deprecated and not needed (a ``DeprecationWarning`` when given).
    """

    def __init__(
        self, val_metric: str, patience: int, mode: str = "max", min_delta: float = 0.0, *,
        eval_period: Optional[int] = None,
    ) -> None:
        super().__init__(val_metric, mode, eval_period)
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStopping patience must be a number of evaluations >= 1, got {patience!r}.")
        if not min_delta >= 0:
            raise ValueError(f"EarlyStopping min_delta must be >= 0 (an improvement margin), got {min_delta!r}.")
        self._patience = patience
        self._min_delta = float(min_delta)
        self.num_bad_evals = 0

    def after_step(self) -> None:
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

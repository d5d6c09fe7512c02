"""Learning-rate schedules as fvcore ParamSchedulers, and the torch scheduler that applies them.

A schedule is a function of training progress ``where`` (0 at the start, 1 at ``max_iter``) that returns a
multiplier. :class:`LRMultiplier` is a torch LR scheduler that sets each parameter group's LR to its base LR times
that multiplier, so one schedule serves groups with different base LRs (e.g. ``BIAS_LR_FACTOR``).
"""
import logging
from typing import Any, Dict, List

import torch
from fvcore.common import param_scheduler as _fvcore
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    LinearParamScheduler,
    ParamScheduler,
)

__all__ = ["WarmupParamScheduler", "LRMultiplier", "StepWithFixedGammaParamScheduler"]

logger = logging.getLogger(__name__)


class WarmupParamScheduler(CompositeParamScheduler):
    """Adds a warmup phase in front of a schedule.

    During the first ``warmup_length`` of training the value goes from ``warmup_factor * scheduler(0)`` to the
    value the schedule has where the warmup ends (linearly), or stays at ``warmup_factor * scheduler(0)``
    (constant). After the warmup the schedule takes over where it would have been anyway, so a step of a
    multi-step schedule that falls inside the warmup still happens; with ``rescale_interval=True`` the whole
    schedule is instead squeezed into what remains after the warmup and starts from its beginning.
    """

    def __init__(
        self,
        scheduler: ParamScheduler,
        warmup_factor: float,
        warmup_length: float,
        warmup_method: str = "linear",
        rescale_interval: bool = False,
    ) -> None:
        """
        Args:
            scheduler: the schedule to warm up.
            warmup_factor: the multiplier, relative to ``scheduler(0)``, at which the warmup starts.
            warmup_length: the fraction of training the warmup takes, in [0, 1].
            warmup_method: "linear" or "constant".
            rescale_interval: if True, the schedule runs over ``[warmup_length, 1]`` rescaled to its whole length;
                if False, it runs on the original time axis and the warmup covers its first part.
        """
        if not 0.0 <= warmup_length <= 1.0:
            raise ValueError(f"warmup_length is a fraction of training in [0, 1], got {warmup_length}")
        end_value = scheduler(0.0) if rescale_interval else scheduler(warmup_length)
        start_value = warmup_factor * scheduler(0.0)
        if warmup_method == "constant":
            warmup: ParamScheduler = ConstantParamScheduler(start_value)
        elif warmup_method == "linear":
            warmup = LinearParamScheduler(start_value, end_value)
        else:
            raise ValueError(f"Unknown warmup_method {warmup_method!r}; use 'linear' or 'constant'")
        # A schedule squeezed into a zero-length interval cannot be rescaled (division by zero); it is never
        # used before the end of training then anyway.
        rescale = rescale_interval and warmup_length < 1.0
        super().__init__(
            [warmup, scheduler],
            interval_scaling=["rescaled", "rescaled" if rescale else "fixed"],
            lengths=[warmup_length, 1.0 - warmup_length],
        )


class StepWithFixedGammaParamScheduler(_fvcore.StepWithFixedGammaParamScheduler):
    """fvcore's ``StepWithFixedGammaParamScheduler``, also defined at the end of training.

    The value is ``base_value * gamma**k`` on the k-th of ``num_decays + 1`` equal parts of training. fvcore's
    version raises IndexError at ``where == 1`` (the scheduler step after the last iteration); this one keeps the
    last value there.
    """

    def __call__(self, where: float) -> float:
        # fvcore picks the part with int((where + WHERE_EPSILON) * num_parts), which overflows from
        # where = 1 - WHERE_EPSILON on. Any where from 1 - 2 * WHERE_EPSILON on lies in the last part.
        return super().__call__(min(where, 1.0 - 2 * self.WHERE_EPSILON))


class LRMultiplier(torch.optim.lr_scheduler.LRScheduler):
    """A torch LR scheduler that sets each group's LR to ``base_lr * multiplier(iteration / max_iter)``.

    It is stepped once per iteration (after ``optimizer.step()``). From ``max_iter`` on the multiplier is read at
    ``where = 1``, so stepping past the end keeps the final value instead of raising or wrapping around. The
    multiplier must therefore be defined at ``where = 1``; those trainkit builds are (fvcore's
    ``ConstantParamScheduler`` and ``StepWithFixedGammaParamScheduler`` are not, hence trainkit's own
    :class:`StepWithFixedGammaParamScheduler`).

    ``state_dict()`` holds plain data only (``base_lrs`` and ``last_epoch``), so a checkpoint loads with
    ``torch.load(weights_only=True)``; the schedule itself is rebuilt from the config.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, multiplier: ParamScheduler, max_iter: int, last_iter: int = -1
    ) -> None:
        """
        Args:
            optimizer: the optimizer whose groups' LRs are set. Each group's LR when this is built (or its
                ``initial_lr`` when resuming) is its base LR.
            multiplier: maps training progress in [0, 1] to a multiplier, e.g. a :class:`WarmupParamScheduler`.
            max_iter: the number of iterations the schedule spans.
            last_iter: the last iteration already done; -1 for a fresh start (the usual case: to resume, build
                with -1 and call :meth:`load_state_dict`).
        """
        if not isinstance(multiplier, ParamScheduler):
            raise TypeError(f"multiplier must be an fvcore ParamScheduler, got {type(multiplier).__name__}")
        if max_iter <= 0:
            raise ValueError(f"max_iter must be a positive number of iterations, got {max_iter}")
        self._multiplier = multiplier
        self._max_iter = max_iter
        super().__init__(optimizer, last_epoch=last_iter)

    def state_dict(self) -> Dict[str, Any]:
        """Returns ``{"base_lrs": [...], "last_epoch": int}``: plain data, safe for ``weights_only`` loads."""
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores the iteration and base LRs, and sets the optimizer's LRs to the schedule's value there.

        Setting the LRs makes the restore exact whatever the order of loading: the next ``step()`` gives the
        same LR as it would have without the save and load.
        """
        base_lrs = list(state_dict["base_lrs"])
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(
                f"The saved scheduler state has {len(base_lrs)} base LRs but the optimizer has "
                f"{len(self.optimizer.param_groups)} parameter groups; was the model or optimizer built differently?"
            )
        self.base_lrs = base_lrs
        self.last_epoch = int(state_dict["last_epoch"])
        lrs = self._lrs_at(self.last_epoch)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs

    def get_lr(self) -> List[float]:
        """The LRs for the current ``last_epoch`` (called by ``step()``; use ``get_last_lr()`` to read them)."""
        return self._lrs_at(self.last_epoch)

    def _lrs_at(self, iteration: int) -> List[float]:
        where = min(iteration / self._max_iter, 1.0)
        multiplier = self._multiplier(where)
        return [base_lr * multiplier for base_lr in self.base_lrs]

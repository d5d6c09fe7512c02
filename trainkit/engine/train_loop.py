"""The training loop: hooks, the loop itself, and the one training step.

This file knows nothing of configs. It imports torch, :mod:`trainkit.utils.events` and the loss log only.

Reading guide: :meth:`TrainerBase.train` is the loop; :meth:`SimpleTrainer.run_step` is everything one
iteration does; its losses wait in a :class:`~trainkit.engine.loss_log.LossLog` until the next flush, the only
place where they leave the device.
"""
import contextlib
import logging
import math
import operator
import weakref
from functools import reduce
from time import perf_counter
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from trainkit.engine.loss_log import LossLog
from trainkit.utils.events import EventStorage, get_event_storage
from trainkit.utils.periods import period_fires

__all__ = ["HookBase", "TrainerBase", "SimpleTrainer", "AMPTrainer"]

logger = logging.getLogger(__name__)

class HookBase:
    """Base class of the hooks that a :class:`TrainerBase` calls.

    The five hook points are called in this order::

        hook.before_train()
        for iter in range(start_iter, max_iter):
            hook.before_step()
            trainer.run_step()        # calls hook.after_backward() between backward and the optimizer step
            hook.after_step()
        iter += 1
        hook.after_train()           # also when training raised

    Every method is a no-op by default; override the ones you need. Hooks of one trainer run in the order
    they were registered. Keep ``before_step`` and ``after_backward`` cheap: they run inside every step.
    Slow or periodic work belongs in ``after_step``.

    Attributes:
        trainer: a weak reference (``weakref.proxy``) to the trainer, set by :meth:`TrainerBase.register_hooks`.
    """

    trainer: "TrainerBase" = None  # type: ignore[assignment]

    def before_train(self) -> None:
        """Called once, before the first iteration."""

    def after_train(self) -> None:
        """Called once, after the last iteration or after training raised."""

    def before_step(self) -> None:
        """Called before each iteration."""

    def after_backward(self) -> None:
        """Called after the backward pass of each iteration, before the optimizer step."""

    def after_step(self) -> None:
        """Called after each iteration."""

    def state_dict(self) -> Dict[str, Any]:
        """The hook's state to save in checkpoints; empty (not saved) by default."""
        return {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores the state that :meth:`state_dict` returned."""


class TrainerBase:
    """The loop: runs iterations and calls the registered hooks around them.

    Attributes:
        iter: the current iteration. Inside a step it equals ``storage.iter``. After training ends normally it
            equals ``max_iter`` (already when ``after_train`` runs), so a hook can tell success from failure;
            after :meth:`request_stop` it is the next iteration to run.
        start_iter: the iteration training started (or resumed) at.
        max_iter: the iteration training ends at (exclusive).
        storage: the :class:`EventStorage` of the run, open during :meth:`train`.
    """

    def __init__(self) -> None:
        self._hooks: List[HookBase] = []
        self.iter: int = 0
        self.start_iter: int = 0
        self.max_iter: int = 0
        self.storage: EventStorage
        self.stop_reason: Optional[str] = None
        self._storage_state: Optional[Dict[str, Any]] = None  # loaded from a checkpoint, used by train()

    def register_hooks(self, hooks: Iterable[Optional[HookBase]]) -> None:
        """Appends hooks; ``None`` entries are skipped. Hooks run in registration order.

        Each hook gets ``hook.trainer = weakref.proxy(self)``, so hooks do not keep the trainer alive.
        """
        hooks = [h for h in hooks if h is not None]
        for h in hooks:
            if not isinstance(h, HookBase):
                raise TypeError(f"register_hooks() takes HookBase instances, got {type(h).__name__}: {h!r}")
            h.trainer = weakref.proxy(self)
        self._hooks.extend(hooks)

    def train(self, start_iter: int, max_iter: int) -> None:
        """Runs iterations ``start_iter .. max_iter - 1``.

        ``after_train`` runs even when a step or a hook raises; the exception then propagates.
        """
        logger.info("Starting training from iteration %d", start_iter)
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        self.stop_reason = None
        with EventStorage(start_iter) as self.storage:
            if self._storage_state is not None:  # resuming: the metric histories continue
                self.storage.load_state_dict(self._storage_state)
                self._storage_state = None
            try:
                self.before_train()
                for self.iter in range(start_iter, max_iter):
                    self.before_step()
                    self.run_step()
                    self.after_step()
                    if self.stop_reason is not None:
                        logger.info("Training stopped after iteration %d: %s", self.iter, self.stop_reason)
                        self.iter += 1
                        break
                else:
                    self.iter = max_iter
            except Exception:
                logger.exception("Exception during training at iteration %d:", self.iter)
                raise
            finally:
                self.after_train()

    def request_stop(self, reason: str) -> None:
        """Ends training after the current iteration: its ``after_step`` hooks still run, then ``after_train``.

        ``iter`` is then the number of the next iteration to run (less than ``max_iter``), and
        ``stop_reason`` holds ``reason``. Hooks use it for preemption and early stopping.
        """
        self.stop_reason = reason

    def before_train(self) -> None:
        for h in self._hooks:
            h.before_train()

    def after_train(self) -> None:
        if self.iter == self.max_iter:
            # Finished: what is put now (a final evaluation) belongs after the last iteration. A stopped or
            # failed run keeps the storage at the iteration it was in.
            self.storage.iter = self.iter
        # Every hook's after_train runs, also after one of them raised (a writer after it must still flush and
        # close); the first error is raised once all have run.
        errors = []
        for h in self._hooks:
            try:
                h.after_train()
            except Exception as e:
                logger.exception("after_train of %s raised; the other hooks' after_train still run:", type(h).__name__)
                errors.append(e)
        if errors:
            raise errors[0]

    def before_step(self) -> None:
        self.storage.iter = self.iter  # values put during this step belong to this iteration
        for h in self._hooks:
            h.before_step()

    def after_backward(self) -> None:
        for h in self._hooks:
            h.after_backward()

    def after_step(self) -> None:
        for h in self._hooks:
            h.after_step()

    def run_step(self) -> None:
        """One iteration of training. Subclasses implement it."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        """The iteration, the metric histories and the state of every hook that has one (keyed by the hook's
        qualified class name)."""
        ret: Dict[str, Any] = {"iteration": self.iter}
        storage = getattr(self, "storage", None)
        if storage is not None:
            ret["storage"] = storage.state_dict()
        hooks_state = {}
        for h in self._hooks:
            sd = h.state_dict()
            if sd:
                name = type(h).__qualname__
                if name in hooks_state:
                    logger.warning("Two hooks of class %s have state; only the first one's is saved.", name)
                    continue
                hooks_state[name] = sd
        if hooks_state:
            ret["hooks"] = hooks_state
        return ret

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores the iteration and the hooks' states saved by :meth:`state_dict`; the metric histories are
        restored when :meth:`train` opens the storage.

        Raises:
            ValueError: the saved iteration is not a whole number >= 0 (a checkpoint that was edited or broken).
        """
        iteration = state_dict.get("iteration")
        if type(iteration) is not int or not 0 <= iteration < 2**53:
            raise ValueError(
                "the trainer state's 'iteration' must be a whole number in [0, 2**53) (the last finished iteration), "
                f"got {iteration!r}; this checkpoint cannot be resumed from. Resume from another checkpoint in the "
                "folder."
            )
        self.iter = iteration
        self._storage_state = state_dict.get("storage")
        for key, value in state_dict.get("hooks", {}).items():
            for h in self._hooks:
                if type(h).__qualname__ == key:
                    h.load_state_dict(value)
                    break
            else:
                logger.warning("Cannot find a hook for state %r in the checkpoint; its state is not loaded.", key)


def _sum_losses(loss_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
    try:
        return reduce(operator.add, loss_dict.values())  # a single loss is returned as it is, with no add
    except TypeError:
        if loss_dict:
            raise
        raise ValueError(
            "The model returned an empty dict of losses; in training mode it must return a dict of scalar loss "
            "tensors (or one loss tensor)."
        ) from None


class SimpleTrainer(TrainerBase):
    """The training step for the common case: one model that returns losses, one optimizer, one data source.

    One step: fetch data (timed as ``data_time``), forward to a dict of losses (a single tensor counts as
    ``{"total_loss": t}``), sum, zero_grad, backward, ``after_backward`` hooks, record the losses, optimizer
    step.

    Gradient accumulation: with ``grad_accum_steps=k`` one step (one iteration) draws ``k`` micro-batches and
    runs data, forward and backward of the summed losses divided by ``k`` for each, then the ``after_backward``
    hooks and the optimizer step once. The gradients are those of the mean loss over the ``k`` micro-batches,
    the same as one batch ``k`` times as large (for losses that are means over the batch). Under
    DistributedDataParallel the first ``k - 1`` backward passes skip the all-reduce (``model.no_sync()``).
    The recorded losses are each loss's mean over the micro-batches; ``data_time`` is their sum.

    Metrics without host syncs: the losses wait on their device in :attr:`loss_log`. Every
    ``gather_metric_period`` iterations and at the last iteration the step flushes them: one collective to
    average them across processes, one transfer to the host, then every iteration's values go into the
    storage.

    A non-finite total loss raises ``FloatingPointError`` naming its iteration. Losses on the CPU are checked
    in the iteration itself, before its optimizer step, as in detectron2: reading them costs no device sync.
    Losses on a GPU are checked at the flush, so that the step never waits for the device: the weights may
    then take up to ``gather_metric_period - 1`` optimizer steps on NaN before the error, but no checkpoint
    holds them, because every hook that saves a checkpoint flushes first. ``gather_metric_period=1``
    (``SOLVER.LOG_PERIOD 1``) checks every step on a GPU too, at the cost of one host sync per step.

    Args:
        model: returns a dict of scalar loss tensors (or one tensor) from ``model(batch)`` in training mode.
        data_loader: an iterable of batches; iterated without end (wrap a finite one yourself).
        optimizer: a torch optimizer.
        gather_metric_period: iterations between two flushes of the losses (default 20).
        zero_grad_before_forward: call ``optimizer.zero_grad()`` before the forward instead of after it.
        async_write_metrics: flush after the optimizer step instead of before it, so that on a GPU the host
            launches the optimizer step before it waits for the losses. They still reach the storage in the
            same step, before the hooks; a non-finite loss then raises after that step instead of before it.
        grad_accum_steps: micro-batches per optimizer step (default 1: none accumulated). The data loader
            yields micro-batches: one optimizer step sees ``grad_accum_steps`` of its batches.
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        gather_metric_period: int = 20,
        zero_grad_before_forward: bool = False,
        async_write_metrics: bool = False,
        *,
        grad_accum_steps: int = 1,
    ) -> None:
        super().__init__()
        if gather_metric_period < 1:
            raise ValueError(f"gather_metric_period must be >= 1, got {gather_metric_period}")
        if type(grad_accum_steps) is not int or grad_accum_steps < 1:
            raise ValueError(
                f"grad_accum_steps must be a whole number >= 1 (micro-batches per optimizer step), got "
                f"{grad_accum_steps!r}"
            )
        model.train()
        self.model = model
        self.data_loader = data_loader
        self._data_loader_iter_obj: Optional[Any] = None
        self.optimizer = optimizer
        self.gather_metric_period = gather_metric_period
        self.zero_grad_before_forward = zero_grad_before_forward
        self.async_write_metrics = async_write_metrics
        self.grad_accum_steps = grad_accum_steps
        self.loss_log = LossLog()

    # ---- the step ------------------------------------------------------------------------------------------
    def run_step(self) -> None:
        """One iteration: data, forward, backward (of each micro-batch), ``after_backward`` hooks, losses,
        optimizer step."""
        if not self.model.training:
            raise RuntimeError("SimpleTrainer.run_step: the model was switched to eval mode; call model.train().")
        if self.grad_accum_steps == 1:
            loss_dict, losses, data_time = self._forward_backward(first=True)
        else:
            loss_dict, losses, data_time = self._accumulate_gradients()
        self.after_backward()

        self.loss_log.record(self.iter, loss_dict, losses, data_time)
        if losses.is_cpu and not math.isfinite(losses.item()):
            # Reading a CPU loss costs no device sync: stop in this iteration, before the optimizer step, as
            # detectron2 does. The flush puts the iterations before it and raises FloatingPointError. It stays on
            # this process: the others may not be at a flush now.
            self.loss_log.flush(reduce=False)
        flush = period_fires(self.gather_metric_period, self.iter, self.max_iter)
        if flush and not self.async_write_metrics:
            self.loss_log.flush()  # before the optimizer step: a NaN loss leaves the weights untouched
        self.optimizer_step()
        if flush and self.async_write_metrics:
            self.loss_log.flush()

    def _forward_backward(
        self, first: bool, accum: int = 1
    ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, float]:
        # One (micro-)batch: data (timed), forward, backward of the summed losses (divided by ``accum``). The
        # gradients are zeroed at the first micro-batch of an optimizer step only, so that the others add up.
        start = perf_counter()
        data = next(self._data_loader_iter)
        data_time = perf_counter() - start

        if first and self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        loss_dict = self.compute_losses(data)
        losses = _sum_losses(loss_dict)
        if first and not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        self.backward(losses if accum == 1 else losses / accum)
        return loss_dict, losses, data_time

    def _accumulate_gradients(self) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, float]:
        # grad_accum_steps micro-batches, the gradient all-reduce (DDP) in the last one's backward only.
        # Returns each loss's mean over the micro-batches, their sum, and the total data time.
        k = self.grad_accum_steps
        sums: Dict[str, torch.Tensor] = {}
        data_time = 0.0
        for i in range(k):
            with _no_gradient_sync(self.model) if i < k - 1 else contextlib.nullcontext():
                loss_dict, _, micro_time = self._forward_backward(first=i == 0, accum=k)
            data_time += micro_time
            for name, loss in loss_dict.items():
                sums[name] = loss.detach() + sums[name] if name in sums else loss.detach()
        if list(sums) != list(loss_dict):
            raise ValueError(
                f"The model returned other losses in the micro-batches of one step ({list(sums)} in all, "
                f"{list(loss_dict)} in the last); it must return the same loss names for every batch."
            )
        means = {name: total / k for name, total in sums.items()}
        return means, _sum_losses(means), data_time

    def compute_losses(self, data: Any) -> Dict[str, torch.Tensor]:
        """The forward: ``model(data)`` as a dict of losses (under autocast in :class:`AMPTrainer`)."""
        loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            return {"total_loss": loss_dict}
        return loss_dict

    def backward(self, losses: torch.Tensor) -> None:
        """The backward pass (a scaled one in :class:`AMPTrainer`)."""
        losses.backward()

    def optimizer_step(self) -> None:
        """The optimizer step (through the grad scaler in :class:`AMPTrainer`)."""
        self.optimizer.step()

    @property
    def _data_loader_iter(self) -> Any:
        # Created on first use, so that a resumed run can reposition the loader before iteration starts.
        if self._data_loader_iter_obj is None:
            self._data_loader_iter_obj = iter(self.data_loader)
        return self._data_loader_iter_obj

    def reset_data_loader(self, data_loader_builder: Callable[[], Iterable]) -> None:
        """Replaces the data loader with ``data_loader_builder()``; iteration restarts from its beginning."""
        del self.data_loader
        self._data_loader_iter_obj = None
        self.data_loader = data_loader_builder()

    def flush_metrics(self) -> None:
        """Moves the recorded losses into the storage now (:meth:`LossLog.flush`).

        With several processes this is a collective (every rank must call it at the same iteration); hooks
        that need up-to-date metrics, such as a checkpointer, call it. Raises ``FloatingPointError`` when a
        total loss is not finite, naming the first such iteration.
        """
        self.loss_log.flush()

    def after_train(self) -> None:
        # A failed run writes what it has from this rank alone: other ranks may never reach a collective.
        orderly = self.iter == self.max_iter or self.stop_reason is not None
        try:
            self.loss_log.flush(reduce=orderly)
        except FloatingPointError:
            if orderly:
                raise
        finally:
            # The hooks' after_train runs also when this final flush finds a non-finite loss (a stopped run).
            super().after_train()

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The loop's state and the optimizer's."""
        ret = super().state_dict()
        ret["optimizer"] = self.optimizer.state_dict()
        return ret

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.optimizer.load_state_dict(state_dict["optimizer"])


def _no_gradient_sync(model: nn.Module) -> ContextManager[None]:
    # DistributedDataParallel (and anything with its no_sync()) skips the all-reduce of the backward passes
    # inside; FSDP2's fully_shard modules say it with set_requires_gradient_sync. Other models: nothing to skip.
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _without_requires_gradient_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _without_requires_gradient_sync(model: nn.Module) -> Any:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _device_type(model: nn.Module) -> str:
    for p in model.parameters():
        return p.device.type
    return "cpu"


class AMPTrainer(SimpleTrainer):
    """:class:`SimpleTrainer` with automatic mixed precision.

    The step is the same; only the autocast context, the backward and the optimizer step differ. float16 uses
    a ``torch.amp.GradScaler`` (its state is saved with the trainer's); bfloat16 needs none and works on CPU.
    With gradient accumulation every micro-batch's backward is scaled, and the scaler steps and updates once
    per optimizer step.

    Args:
        grad_scaler: the scaler for float16; one is created when None. bfloat16 needs none (one given is used).
        precision: ``torch.float16`` or ``torch.bfloat16``.
        log_grad_scaler: put the scaler's scale into the storage as ``[metric]grad_scaler`` each step
            (as a tensor: no host sync).
        Other arguments: as in :class:`SimpleTrainer`.
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        gather_metric_period: int = 20,
        zero_grad_before_forward: bool = False,
        grad_scaler: Optional[torch.amp.GradScaler] = None,
        precision: torch.dtype = torch.float16,
        log_grad_scaler: bool = False,
        async_write_metrics: bool = False,
        *,
        grad_accum_steps: int = 1,
    ) -> None:
        super().__init__(
            model, data_loader, optimizer, gather_metric_period, zero_grad_before_forward, async_write_metrics,
            grad_accum_steps=grad_accum_steps,
        )
        if precision not in (torch.float16, torch.bfloat16):
            raise ValueError(f"AMPTrainer precision must be torch.float16 or torch.bfloat16, got {precision}")
        self.device_type = _device_type(model)
        if precision == torch.float16 and grad_scaler is None:
            grad_scaler = torch.amp.GradScaler(self.device_type)
        self.grad_scaler = grad_scaler
        self.precision = precision
        self.log_grad_scaler = log_grad_scaler

    def compute_losses(self, data: Any) -> Dict[str, torch.Tensor]:
        with torch.autocast(device_type=self.device_type, dtype=self.precision):
            return super().compute_losses(data)

    def backward(self, losses: torch.Tensor) -> None:
        if self.grad_scaler is None:
            losses.backward()
        else:
            self.grad_scaler.scale(losses).backward()

    def optimizer_step(self) -> None:
        if self.grad_scaler is None:
            self.optimizer.step()
            return
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        if self.log_grad_scaler:
            get_event_storage().put_scalar("[metric]grad_scaler", self.grad_scaler._get_scale_async())

    def state_dict(self) -> Dict[str, Any]:
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])

"""The training loop: hooks, the loop itself, and the one training step.

This file knows nothing of configs. It imports torch and :mod:`trainkit.utils.events` only (plus the rank
helpers of :mod:`trainkit.utils.comm`, which are thin wrappers over torch.distributed).

Reading guide: :meth:`TrainerBase.train` is the loop; :meth:`SimpleTrainer.run_step` is everything one
iteration does; :meth:`SimpleTrainer.flush_metrics` is the only place the step's metrics leave the device.
"""
import concurrent.futures
import logging
import math
import operator
import weakref
import zlib
from functools import reduce
from time import perf_counter
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from trainkit.utils import comm
from trainkit.utils.events import EventStorage, get_event_storage

__all__ = ["HookBase", "TrainerBase", "SimpleTrainer", "AMPTrainer"]

logger = logging.getLogger(__name__)

_HOOK_POINTS = ("before_train", "after_train", "before_step", "after_backward", "after_step")


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
        self._dispatch: Dict[str, List[Callable[[], None]]] = {p: [] for p in _HOOK_POINTS}
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
        self._rebuild_dispatch()

    def _rebuild_dispatch(self) -> None:
        # Call only the methods a hook overrides: an empty hook point then costs nothing per step.
        for point in _HOOK_POINTS:
            self._dispatch[point] = [
                getattr(h, point) for h in self._hooks if getattr(type(h), point) is not getattr(HookBase, point)
            ]

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
        for fn in self._dispatch["before_train"]:
            fn()

    def after_train(self) -> None:
        if self.iter == self.max_iter:
            # Finished: what is put now (a final evaluation) belongs after the last iteration. A stopped or
            # failed run keeps the storage at the iteration it was in.
            self.storage.iter = self.iter
        # Every hook's after_train runs, also after one of them raised (a writer after it must still flush and
        # close); the first error is raised once all have run.
        errors = []
        for fn in self._dispatch["after_train"]:
            try:
                fn()
            except Exception as e:
                hook = type(getattr(fn, "__self__", fn)).__name__
                logger.exception("after_train of %s raised; the other hooks' after_train still run:", hook)
                errors.append(e)
        if errors:
            raise errors[0]

    def before_step(self) -> None:
        # Values put during this step belong to this iteration (the `iter` setter, without its int(): this
        # runs every step).
        self.storage._iter = self.iter
        for fn in self._dispatch["before_step"]:
            fn()

    def after_backward(self) -> None:
        for fn in self._dispatch["after_backward"]:
            fn()

    def after_step(self) -> None:
        for fn in self._dispatch["after_step"]:
            fn()

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
        restored when :meth:`train` opens the storage."""
        self.iter = state_dict["iteration"]
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


_detach = torch.Tensor.detach


class SimpleTrainer(TrainerBase):
    """The training step for the common case: one model that returns losses, one optimizer, one data source.

    One step: fetch data (timed as ``data_time``), forward to a dict of losses (a single tensor counts as
    ``{"total_loss": t}``), sum, zero_grad, backward, ``after_backward`` hooks, optimizer step.

    Metrics without host syncs: the step keeps each iteration's losses as device tensors. Every
    ``gather_metric_period`` iterations (and at the last iteration) :meth:`flush_metrics` stacks the pending
    ones, averages them across processes in one collective, moves them to the host in one transfer and puts
    every iteration's values into the storage. A non-finite total loss raises ``FloatingPointError`` naming
    the first bad iteration, at the latest at that gather (before the optimizer step of that iteration).
    ``gather_metric_period=1`` checks and writes every step, like detectron2.

    Losses computed on the CPU are read as floats in their own step instead (see
    :attr:`read_cpu_losses_at_once`): there is no device to wait for, and the gathers stay as they are.

    Args:
        model: returns a dict of scalar loss tensors (or one tensor) from ``model(batch)`` in training mode.
        data_loader: an iterable of batches; iterated without end (wrap a finite one yourself).
        optimizer: a torch optimizer.
        gather_metric_period: iterations between two metric gathers (default 20).
        zero_grad_before_forward: call ``optimizer.zero_grad()`` before the forward instead of after it.
        async_write_metrics: at a gather, move the metrics to the host on a background thread while the
            optimizer step is launched; they reach the storage at the end of the same step, before the hooks.
            Worth it on GPUs (the host does not stall before launching the step); a non-finite loss then
            raises after that step instead of before it.
    """

    #: Read losses that live on the CPU as floats in their own step. Reading a CPU tensor is a memory load, not
    #: a transfer, and it is cheaper than keeping one tensor per iteration until the gather (4 us per step on
    #: the tiny workload of benchmarks/overhead.py). Losses on an accelerator are always kept as tensors until
    #: the gather. Set it to False to treat CPU losses like device ones (the tests do, to check that path
    #: without a GPU).
    read_cpu_losses_at_once: bool = True

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        gather_metric_period: int = 20,
        zero_grad_before_forward: bool = False,
        async_write_metrics: bool = False,
    ) -> None:
        super().__init__()
        if gather_metric_period < 1:
            raise ValueError(f"gather_metric_period must be >= 1, got {gather_metric_period}")
        model.train()
        self.model = model
        self.data_loader = data_loader
        self._data_loader_iter_obj: Optional[Any] = None
        self.optimizer = optimizer
        self.gather_metric_period = gather_metric_period
        self.zero_grad_before_forward = zero_grad_before_forward
        self.async_write_metrics = async_write_metrics
        # Pending metrics: the loss names; per iteration its number and data_time; the losses of every pending
        # iteration, row after row (one value per name): floats for CPU losses read at once, else detached
        # tensors.
        self._pending_keys: Tuple[str, ...] = ()
        self._pending_names: Tuple[str, ...] = ()
        self._pending_on_cpu: Optional[bool] = None
        self._next_keys: Optional[Tuple[str, ...]] = None  # set while the pending losses are flushed for a change
        self._pending_floats = False  # the pending losses are floats (CPU losses read at once), not tensors
        self._pending_iters: List[int] = []
        self._pending_losses: List[Union[float, torch.Tensor]] = []
        self._pending_data_time: List[float] = []
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._inflight: Optional[Any] = None  # (future, (names, iters, data_time)) of an async gather

    # ---- the step ------------------------------------------------------------------------------------------
    def run_step(self) -> None:
        """One iteration: data, forward, backward, ``after_backward`` hooks, metrics, optimizer step."""
        if not self.model.training:
            raise RuntimeError("SimpleTrainer.run_step: the model was switched to eval mode; call model.train().")
        start = perf_counter()
        data = next(self._data_loader_iter)
        data_time = perf_counter() - start

        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        loss_dict = self.compute_losses(data)
        losses = _sum_losses(loss_dict)
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        self.backward(losses)
        self.after_backward()

        self._record_metrics(loss_dict, losses, data_time)
        self.optimizer_step()
        if self._inflight is not None:  # async_write_metrics: the transfer overlapped the optimizer step
            self._finish_gather()

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

    # ---- metrics -------------------------------------------------------------------------------------------
    def _record_metrics(self, loss_dict: Mapping[str, torch.Tensor], losses: torch.Tensor, data_time: float) -> None:
        keys = tuple(loss_dict)
        on_cpu = losses.is_cpu
        if keys != self._pending_keys or on_cpu is not self._pending_on_cpu:
            self._set_loss_names(keys, on_cpu)
        pending = self._pending_losses
        if self._pending_floats:
            # Looked up here, not bound once like _detach: a patched Tensor.item (the tests' transfer counter)
            # must see these reads.
            pending.extend(map(torch.Tensor.item, loss_dict.values()))
            if len(keys) > 1:
                pending.append(losses.item())
        else:
            pending.extend(map(_detach, loss_dict.values()))
            if len(keys) > 1:
                pending.append(losses.detach())
        it = self.iter
        self._pending_iters.append(it)
        self._pending_data_time.append(data_time)
        if (it + 1) % self.gather_metric_period == 0 or it == self.max_iter - 1:
            self._start_gather(reduce=True, in_background=self.async_write_metrics)

    def _set_loss_names(self, keys: Tuple[str, ...], on_cpu: bool) -> None:
        # The model returned other losses than before, or on another device (or it is the first step): write
        # what is pending first.
        self._next_keys = keys  # named in the error when other processes do not change alike
        try:
            self.flush_metrics()
        finally:
            self._next_keys = None
        if len(keys) > 1 and "total_loss" in keys:
            raise ValueError(
                f"The model returned a loss named 'total_loss' besides other losses ({list(keys)}); trainkit "
                "records their sum under that name. Rename that loss."
            )
        self._pending_keys = keys
        self._pending_names = keys if len(keys) == 1 else keys + ("total_loss",)
        self._pending_on_cpu = on_cpu
        self._pending_floats = on_cpu and self.read_cpu_losses_at_once

    def flush_metrics(self, reduce: bool = True) -> None:
        """Moves the pending per-iteration metrics into the storage now.

        With several processes this is a collective (every rank must call it at the same iteration); hooks
        that need up-to-date metrics, such as a checkpointer, call it. Raises ``FloatingPointError`` when a
        total loss is not finite, naming the first such iteration.

        Args:
            reduce: average across processes. Only ``after_train`` passes False, when training failed and the
                other ranks may not be there to meet.
        """
        self._start_gather(reduce, in_background=False)
        self._finish_gather()

    def _start_gather(self, reduce: bool, in_background: bool) -> None:
        # Stacks (and reduces) the pending metrics on the device; the host transfer runs here, or on a
        # background thread while the step goes on (the optimizer step's kernels get launched meanwhile).
        # Floats (CPU losses read at once) need no transfer and go to the storage here.
        self._finish_gather()
        if not self._pending_iters:
            return
        batch = (self._pending_names, self._pending_iters, self._pending_data_time)
        values, data_time_included = self._gather_on_device(reduce)
        self._pending_iters, self._pending_losses, self._pending_data_time = [], [], []
        if data_time_included:
            batch = batch[:2] + (None,)
        if isinstance(values, list):  # already on the host
            self._put_metrics(values, *batch)
        elif in_background:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="trainkit-metrics")
            self._inflight = (self._executor.submit(values.tolist), batch)
        else:
            self._put_metrics(values.tolist(), *batch)

    def _finish_gather(self) -> None:
        if self._inflight is not None:
            future, batch = self._inflight
            self._inflight = None
            self._put_metrics(future.result(), *batch)

    def _gather_on_device(self, reduce: bool) -> Tuple[Union[List[float], torch.Tensor], bool]:
        # The pending losses, iterations x metrics, row-major: floats as they are, tensors as one flat tensor
        # (one stack, one transfer). With several processes, data_time joins as a last column and the
        # collective reduces the losses to their mean and data_time to its maximum (the slowest rank is what
        # everyone waits for). Returns the values and whether data_time is in them (otherwise it stays on the
        # host).
        flat = self._pending_losses
        world_size = comm.get_world_size()
        if self._pending_floats:
            if not reduce or world_size == 1:
                return flat, False
            losses = torch.tensor(flat, dtype=torch.float32)
        else:
            try:
                losses = torch.stack(flat)  # promotes mixed float dtypes
            except RuntimeError:  # losses on several devices, or one-element losses of shapes () and (1,) mixed
                losses = torch.stack([t.to(flat[0].device, torch.float32).reshape(()) for t in flat])
            losses = losses.view(-1)  # losses of shape (1,) stack to (n, 1)
            if not reduce or world_size == 1:
                return losses, False
        self._check_ranks_agree_on_pending_metrics()
        data_time = torch.tensor(self._pending_data_time, dtype=torch.float32, device=losses.device)
        values = torch.cat([losses.float().view(len(self._pending_iters), -1), data_time.view(-1, 1)], dim=1)
        gathered = [torch.empty_like(values) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, values)
        stacked = torch.stack(gathered)
        values = torch.cat([stacked[:, :, :-1].mean(dim=0), stacked[:, :, -1:].amax(dim=0)], dim=1)
        return values.view(-1), True

    def _check_ranks_agree_on_pending_metrics(self) -> None:
        # The all_gather of the metrics needs the same shape on every rank; otherwise gloo aborts the process
        # and NCCL hangs. Compare first (count of iterations, the names in order), in one small CPU collective.
        names = self._pending_names
        layout = [len(self._pending_iters), zlib.crc32("\0".join(names).encode())]
        layouts = comm.all_gather_ints(layout)
        if all(other == layout for other in layouts):
            return
        ranks = comm.all_gather((list(names), self._pending_iters[0], self._pending_iters[-1], self._next_keys))
        described = "; ".join(
            f"rank {r}: {n} for iterations {first}..{last}" + (f", then {list(nxt)} from {last + 1}" if nxt else "")
            for r, (n, first, last, nxt) in enumerate(ranks)
        )
        raise RuntimeError(
            f"The processes disagree on the losses to average: {described}. Every process's model must return "
            "the same loss names, in the same order, at every iteration (return a zero loss for one that does not "
            "apply), and flush_metrics() must be called on every process at the same iteration."
        )

    def _put_metrics(
        self, flat: List[float], names: Sequence[str], iters: List[int], data_time: Optional[List[float]]
    ) -> None:
        width = len(names) + (data_time is None)
        columns = [flat[j::width] for j in range(width)]
        if data_time is None:
            data_time = columns.pop()
        total = columns[names.index("total_loss") if "total_loss" in names else 0]
        if not all(map(math.isfinite, total)):
            bad = next(i for i, v in enumerate(total) if not math.isfinite(v))
            # What came before the bad iteration still reaches the storage.
            self._put_series([c[:bad] for c in columns], names, iters[:bad], data_time[:bad])
            raise FloatingPointError(
                f"Loss became infinite or NaN at iteration={iters[bad]}!\n"
                f"loss_dict = {dict(zip(names, (c[bad] for c in columns)))}\n"
                "Checkpoints written before this iteration are untouched."
            )
        self._put_series(columns, names, iters, data_time)

    def _put_series(
        self, columns: List[List[float]], names: Sequence[str], iters: List[int], data_time: List[float]
    ) -> None:
        if not iters:
            return
        storage = get_event_storage()
        for name, column in zip(names, columns):
            storage.put_scalar_series(name, column, iters)
        if "total_loss" not in names:
            storage.put_scalar_series("total_loss", columns[0], iters)
        storage.put_scalar_series("data_time", data_time, iters)

    def after_train(self) -> None:
        # Failed runs write what they have from this rank alone: other ranks may never reach a collective.
        orderly = self.iter == self.max_iter or self.stop_reason is not None
        try:
            self.flush_metrics(reduce=orderly)
        except FloatingPointError:
            if orderly:
                raise
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            # The hooks' after_train runs also when this final gather finds a non-finite loss (a stopped run).
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


def _device_type(model: nn.Module) -> str:
    for p in model.parameters():
        return p.device.type
    return "cpu"


class AMPTrainer(SimpleTrainer):
    """:class:`SimpleTrainer` with automatic mixed precision.

    The step is the same; only the autocast context, the backward and the optimizer step differ. float16 uses
    a ``torch.amp.GradScaler`` (its state is saved with the trainer's); bfloat16 needs none and works on CPU.

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
    ) -> None:
        super().__init__(
            model, data_loader, optimizer, gather_metric_period, zero_grad_before_forward, async_write_metrics
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

"""Hooks: the ways to add behaviour to the training loop without touching it.

Each hook does one thing. They talk to the rest of the run through ``self.trainer`` (a weak reference) and
the trainer's :class:`~trainkit.utils.events.EventStorage`.
"""
import datetime
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from trainkit.checkpoint import PeriodicCheckpointer as _PeriodicCheckpointer
from trainkit.checkpoint.serialization import atomic_save, load_checkpoint_file
from trainkit.engine.ema import EMAHook, ModelEMA
from trainkit.engine.metric_hooks import BestCheckpointer, EarlyStopping
from trainkit.engine.stats_hooks import PreciseBN, TorchMemoryStats
from trainkit.engine.train_loop import HookBase
from trainkit.evaluation.testing import flatten_results_dict
from trainkit.utils import comm
from trainkit.utils.env import preserve_rng_state
from trainkit.utils.events import EventWriter
from trainkit.utils.periods import period_fires

__all__ = [
    "CallbackHook",
    "IterationTimer",
    "LRScheduler",
    "PeriodicWriter",
    "PeriodicCheckpointer",
    "PreemptionHandler",
    "EvalHook",
    "BestCheckpointer",
    "EarlyStopping",
    "EMAHook",
    "ModelEMA",
    "TorchProfiler",
    "TorchMemoryStats",
    "PreciseBN",
]

logger = logging.getLogger(__name__)


class CallbackHook(HookBase):
    """A hook made of functions: each given callback is called with the trainer at its hook point.

    Example::

        CallbackHook(after_step=lambda trainer: print(trainer.iter))
    """

    def __init__(
        self,
        *,
        before_train: Optional[Callable[[Any], None]] = None,
        after_train: Optional[Callable[[Any], None]] = None,
        before_step: Optional[Callable[[Any], None]] = None,
        after_backward: Optional[Callable[[Any], None]] = None,
        after_step: Optional[Callable[[Any], None]] = None,
    ) -> None:
        self._before_train = before_train
        self._after_train = after_train
        self._before_step = before_step
        self._after_backward = after_backward
        self._after_step = after_step

    def before_train(self) -> None:
        if self._before_train:
            self._before_train(self.trainer)

    def after_train(self) -> None:
        if self._after_train:
            self._after_train(self.trainer)
        # The callbacks may be closures that hold the trainer: drop them once training is over.
        self._before_train = self._after_train = self._before_step = self._after_backward = self._after_step = None

    def before_step(self) -> None:
        if self._before_step:
            self._before_step(self.trainer)

    def after_backward(self) -> None:
        if self._after_backward:
            self._after_backward(self.trainer)

    def after_step(self) -> None:
        if self._after_step:
            self._after_step(self.trainer)


def _format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class IterationTimer(HookBase):
    """Puts the wall time of each iteration into the storage as ``time`` and logs the totals at the end.

    Timing starts at the ``warmup_iter``-th iteration of the run, as in detectron2: the first
    ``warmup_iter - 1`` iterations, which include one-off costs such as allocator warm-up and data-loader
    start-up, put no ``time`` (50 iterations with ``warmup_iter=3`` put 48 values). The time runs from its own
    ``before_step`` to its own ``after_step``: register it first so that it covers the step and the other
    hooks' ``before_step`` and ``after_backward``. The other hooks' ``after_step`` (evaluation, checkpoints,
    writing) runs after its own and is not in ``time``; the "Overall training speed" logged at the end covers
    it.

    Args:
        warmup_iter: the first timed iteration of the run, counting from 1 (0 and 1 time every iteration).
    """

    def __init__(self, warmup_iter: int = 3) -> None:
        self._warmup_iter = warmup_iter
        self._step_start = 0.0
        self._step_end = 0.0
        self._train_start = 0.0
        self._timed_start: Optional[float] = None  # wall time when the first timed iteration began
        self._timed_iters = 0
        self._warmup_left = 0  # set by before_train

    def before_train(self) -> None:
        self._train_start = time.perf_counter()
        self._timed_start = None
        self._timed_iters = 0
        self._warmup_left = max(self._warmup_iter - 1, 0)
        self._storage = self.trainer.storage  # this run's; read here once, not through the proxy every step

    def after_train(self) -> None:
        total = time.perf_counter() - self._train_start
        iters = self.trainer.iter - self.trainer.start_iter
        if self._timed_iters > 0 and self._timed_start is not None:
            timed = self._step_end - self._timed_start
            logger.info(
                "Overall training speed: %d iterations in %s (%.4f s / it)",
                self._timed_iters,
                _format_seconds(timed),
                timed / self._timed_iters,
            )
        logger.info("Total training time: %s (%d iterations)", _format_seconds(total), iters)

    def before_step(self) -> None:
        self._step_start = time.perf_counter()

    def after_step(self) -> None:
        self._step_end = now = time.perf_counter()
        if self._warmup_left > 0:
            self._warmup_left -= 1
            return
        if self._timed_start is None:
            self._timed_start = self._step_start
        self._timed_iters += 1
        self._storage.put_scalar("time", now - self._step_start)


# ReduceLROnPlateau became an LRScheduler subclass only in torch 2.2.
_TORCH_SCHEDULERS = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


class LRScheduler(HookBase):
    """Steps a torch LR scheduler after every iteration and puts the learning rate used as ``lr``.

    The scheduler's state is saved with the trainer's. When several parameter groups exist, ``lr`` is that of
    the group with the most parameters (as in detectron2; when every group holds a single parameter, the
    most common LR).

    ``torch.optim.lr_scheduler.ReduceLROnPlateau`` steps on a metric instead: give ``metric``, the name of a
    scalar in the storage (an evaluation result such as ``"classification/top1"``), and the scheduler steps
    once with each new value of it, in the ``after_step`` that follows the value's ``put_scalar`` (with the
    default hook order, the iteration after the evaluation). The hook reads it with
    :meth:`~trainkit.utils.events.EventStorage.latest_value` every step: a number costs no transfer; a metric put
    as a tensor is moved to the host when read.

    Args:
        optimizer: defaults to ``trainer.optimizer``.
        scheduler: defaults to ``trainer.scheduler``.
        metric: for ``ReduceLROnPlateau`` only: the scalar whose new values step it.
    """

    def __init__(
        self, optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Optional[Any] = None,
        metric: Optional[str] = None,
    ) -> None:
        self._optimizer = optimizer
        self._scheduler = scheduler
        self._metric = metric
        self._metric_iter = -1  # the iteration of the last metric value the scheduler stepped on
        self._group = 0

    def before_train(self) -> None:
        self._optimizer = self._optimizer or self.trainer.optimizer
        if self._scheduler is None:
            self._scheduler = self.trainer.scheduler
        self._check_metric(self._scheduler)
        self._group = self._pick_group(self._optimizer)
        self._storage = self.trainer.storage  # this run's; read here once, not through the proxy every step

    def _check_metric(self, scheduler: Any) -> None:
        on_plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if on_plateau and self._metric is None:
            raise ValueError(
                "ReduceLROnPlateau steps on a metric, not on iterations: give the LRScheduler hook the name of a "
                "scalar in the storage, e.g. hooks.LRScheduler(metric='classification/top1') (in a DefaultTrainer, "
                "override build_hooks and replace the LRScheduler hook it returns)."
            )
        if self._metric is not None and not on_plateau:
            raise ValueError(
                f"LRScheduler(metric={self._metric!r}) is for ReduceLROnPlateau, but the scheduler is a "
                f"{type(scheduler).__name__}, which steps every iteration: leave metric out."
            )

    @staticmethod
    def _pick_group(optimizer: torch.optim.Optimizer) -> int:
        # As detectron2: the (first) group with the most parameters; when every group holds one parameter,
        # the first group with the most common LR. So bias groups with BIAS_LR_FACTOR do not set `lr`.
        groups = optimizer.param_groups
        largest = max(len(g["params"]) for g in groups)
        if largest > 1:
            return next(i for i, g in enumerate(groups) if len(g["params"]) == largest)
        lrs = [g["lr"] for g in groups]
        most_common = max(lrs, key=lrs.count)
        return lrs.index(most_common)

    @property
    def scheduler(self) -> Any:
        return self._scheduler or self.trainer.scheduler

    def after_step(self) -> None:
        lr = self._optimizer.param_groups[self._group]["lr"]
        self._storage.put_scalar("lr", lr, smoothing_hint=False)
        if self._metric is None:
            self._scheduler.step()
            return
        # latest_value() reads the history, which a resume restores: a value put just before the checkpoint is
        # still stepped on.
        latest = self._storage.latest_value(self._metric)
        if latest is None:
            return
        value, itr = latest
        if itr > self._metric_iter:
            self._metric_iter = itr
            self._scheduler.step(value)

    def state_dict(self) -> Dict[str, Any]:
        if not isinstance(self.scheduler, _TORCH_SCHEDULERS):
            return {}
        if self._metric is None:
            return self.scheduler.state_dict()
        return {"scheduler": self.scheduler.state_dict(), "metric_iter": self._metric_iter}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if isinstance(self.scheduler, _TORCH_SCHEDULERS):
            logger.info("Loading scheduler from state_dict ...")
            if self._metric is not None:
                if "metric_iter" not in state_dict:
                    raise ValueError(
                        f"LRScheduler(metric={self._metric!r}) got a scheduler state saved without a metric (keys: "
                        f"{sorted(state_dict)}); resume a ReduceLROnPlateau run only from its own checkpoints."
                    )
                self._metric_iter = state_dict["metric_iter"]
                state_dict = state_dict["scheduler"]
            self.scheduler.load_state_dict(state_dict)


class PeriodicWriter(HookBase):
    """Calls each writer's ``write()`` every ``period`` iterations and after the last one, then closes them.

    Its state (saved with the trainer's) is the iteration of its last write. A resumed run tells each writer
    (:meth:`EventWriter.continue_after`) to drop what was written after that and to write it again, so that
    across any kills every iteration is written exactly once. Register it before the checkpointing hooks
    (``DefaultTrainer`` does): then a checkpoint taken at a write iteration comes after that write.

    Args:
        writers: the :class:`EventWriter` s.
        period: iterations between writes. Match the trainer's ``gather_metric_period`` (or a multiple of it):
            losses reach the storage at gathers, so writing more often only repeats the same values.
    """

    def __init__(self, writers: Sequence[EventWriter], period: int = 20) -> None:
        self._writers = list(writers)
        for w in self._writers:
            if not isinstance(w, EventWriter):
                raise TypeError(f"PeriodicWriter takes EventWriter instances, got {type(w).__name__}")
        if period < 1:
            raise ValueError(f"PeriodicWriter period must be >= 1 iteration, got {period}; e.g. SOLVER.LOG_PERIOD.")
        self._period = period
        self._written_through: Optional[int] = None  # the iteration of the last write in after_step
        self._resumed_through: Optional[int] = None  # the same, loaded from a checkpoint

    def before_train(self) -> None:
        if self._resumed_through is not None and self.trainer.start_iter > 0:
            for writer in self._writers:
                writer.continue_after(self._resumed_through)
            self._written_through = self._resumed_through
        else:  # a fresh run; or a checkpoint without this state: the writers write from start_iter on
            self._written_through = self.trainer.start_iter - 1
        self._resumed_through = None

    def after_step(self) -> None:
        if period_fires(self._period, self.trainer.iter, self.trainer.max_iter):
            for writer in self._writers:
                writer.write()
            self._written_through = self.trainer.iter

    def state_dict(self) -> Dict[str, Any]:
        if self._written_through is None:
            return {}
        # Each writer's own state (a tracker's run id), with its class: restored into the writer of the same
        # class at the same position (the same WRITERS build the same list).
        writers = [{"writer": type(w).__qualname__, "state": w.state_dict()} for w in self._writers]
        return {"written_through": self._written_through, "writers": writers}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._resumed_through = state_dict["written_through"]
        for writer, saved in zip(self._writers, state_dict.get("writers", [])):
            if saved["writer"] == type(writer).__qualname__:
                writer.load_state_dict(saved["state"])
            elif saved["state"]:
                logger.warning("The checkpoint's writer state for %s does not go to the %s in its place: the "
                               "writers changed, so it starts afresh (a tracker starts a new run).",
                               saved["writer"], type(writer).__qualname__)

    def after_train(self) -> None:
        # Also after an exception: write what there is, and always close.
        try:
            for writer in self._writers:
                writer.write()
        finally:
            for writer in self._writers:
                writer.close()


def _flush_trainer_metrics(trainer: Any) -> None:
    # Bring the trainer's pending metrics into the storage (and raise on a non-finite loss) before a hook
    # saves or evaluates, so that no checkpoint is written after a NaN went unnoticed.
    flush = getattr(trainer, "flush_metrics", None)
    if flush is not None:
        flush()


class PeriodicCheckpointer(_PeriodicCheckpointer, HookBase):
    """Saves a checkpoint every ``period`` iterations and after the last one (``model_final``).

    The hook form of :class:`trainkit.checkpoint.PeriodicCheckpointer`; ``max_iter`` is taken from the
    trainer. Register it on every process (only the checkpointer of the main process writes): before saving,
    it gathers the trainer's pending metrics, which is a collective.

    Args:
        checkpointer: does the saving; its checkpointables should include the trainer.
        period: iterations between checkpoints.
        max_to_keep: keep the newest N periodic checkpoints (None: all).
        file_prefix: file name prefix.
        async_save: write in a background thread; training stalls only for the copy of the state to host
            memory. ``after_train`` waits for the save in flight and raises its error, if any.
    """

    def __init__(
        self,
        checkpointer: Any,
        period: int,
        max_to_keep: Optional[int] = None,
        file_prefix: str = "model",
        async_save: bool = False,
    ) -> None:
        super().__init__(checkpointer, period, max_iter=None, max_to_keep=max_to_keep, file_prefix=file_prefix,
                         async_save=async_save)

    def before_train(self) -> None:
        self.max_iter = self.trainer.max_iter

    def after_step(self) -> None:
        it = self.trainer.iter
        if period_fires(self.period, it, self.max_iter):
            _flush_trainer_metrics(self.trainer)
        self.step(it)

    def after_train(self) -> None:
        self.checkpointer.wait()  # the final save may still be in flight; its error is raised here
        # A run resumed from the periodic checkpoint of its last iteration ran no iteration: the previous run
        # was killed during the final save. That checkpoint and model_final are the same moment's state.
        t = self.trainer
        if t.start_iter == t.max_iter == t.iter and self.checkpointer.save_to_disk and self.checkpointer.save_dir:
            last = self.checkpointer.get_checkpoint_file()
            if os.path.basename(last) == f"{self.file_prefix}_{t.max_iter - 1:07d}.pth":
                final = f"{self.file_prefix}_final.pth"
                logger.info("Resumed after the last iteration: writing %s from %s.", final, os.path.basename(last))
                atomic_save(load_checkpoint_file(last), os.path.join(self.checkpointer.save_dir, final))
                self.checkpointer.tag_last_checkpoint(final)


class PreemptionHandler(HookBase):
    """Stops training cleanly on SIGTERM or SIGINT: the current iteration finishes, a checkpoint is saved,
    training stops, and ``after_train`` flushes and closes the writers. A second signal ends the process at
    once (the last complete checkpoint stays loadable: checkpoints are written atomically).

    Resume with ``--resume`` (``DefaultTrainer.resume_or_load(resume=True)``): the run continues exactly
    where the uninterrupted one would have been.

    Signal handlers are installed in ``before_train`` (main thread only) and the previous ones restored in
    ``after_train``. With several processes, each usually receives the signal at a slightly different
    moment; they agree every ``check_period`` iterations (one small collective) and stop together.

    Args:
        checkpointer: saves ``model_{iteration:07d}``; its checkpointables should include the trainer.
        signals: the signals that ask for a stop.
        check_period: iterations between the processes' agreements (ignored with a single process, which
            stops after the very iteration during which the signal came).
    """

    def __init__(
        self, checkpointer: Any, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT), check_period: int = 20
    ) -> None:
        self._checkpointer = checkpointer
        self._signals = tuple(signals)
        self._check_period = max(1, int(check_period))
        self._received: Optional[str] = None
        self._pid = os.getpid()
        self._distributed = False
        self._previous: Dict[int, Any] = {}

    def before_train(self) -> None:
        self._received = None
        self._pid = os.getpid()
        self._distributed = comm.get_world_size() > 1  # looked up once: after_step runs every iteration
        if threading.current_thread() is not threading.main_thread():
            logger.warning("PreemptionHandler: not in the main thread, so no signal handlers are installed.")
            return
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked data-loading worker inherited the handler: the trainer's process handles it
        name = signal.Signals(signum).name
        if self._received is not None:
            logger.warning("Received %s again: exiting at once.", name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._received = name
        logger.warning(
            "Received %s: finishing the current iteration, then saving a checkpoint and stopping "
            "(send it again to exit at once).", name
        )

    def after_step(self) -> None:
        received = self._received is not None
        if self._distributed:
            if not period_fires(self._check_period, self.trainer.iter, None):
                return
            received = any(comm.all_gather(received))
        if not received or self.trainer.iter >= self.trainer.max_iter - 1:
            return  # nothing asked, or the last iteration: the final checkpoint is saved anyway
        _flush_trainer_metrics(self.trainer)
        it = self.trainer.iter
        # Blocking: it waits for a background save in flight, then writes this one before the process stops.
        self._checkpointer.save(f"model_{it:07d}", iteration=it, blocking=True)
        reason = self._received or "a signal to another process"
        self.trainer.request_stop(f"received {reason}")
        logger.warning(
            "Stopped by %s after iteration %d; saved checkpoint model_%07d. Run again with --resume to continue.",
            reason, it, it,
        )

    def after_train(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class EvalHook(HookBase):
    """Runs an evaluation function every ``eval_period`` iterations and after the last iteration.

    The results (a nested dict such as ``{"classification": {"top1": 97.2}}``) of the main process are
    flattened into every process's storage as ``task/metric`` scalars at the iteration just finished;
    register the writers after this hook so that they write the final evaluation. The evaluation runs with the
    Python, NumPy and torch RNG states saved and restored, so evaluating does not change the randomness of the
    training that follows.

    Args:
        eval_period: iterations between evaluations; 0 evaluates only after the last iteration.
        eval_function: called without arguments on every process; returns the results dict (or nothing).
        eval_after_train: also evaluate after the last iteration.
    """

    def __init__(self, eval_period: int, eval_function: Callable[[], Any], eval_after_train: bool = True) -> None:
        self._evaluated_final = False
        self._period = eval_period
        self._func = eval_function
        self._eval_after_train = eval_after_train

    def _do_eval(self, put: bool = True) -> None:
        with preserve_rng_state():
            results = self._func()
        if comm.get_world_size() > 1:
            # Evaluators return results on the main process only; every rank's storage gets them, so that
            # hooks deciding from them (best checkpoint, early stopping) decide alike on every rank.
            results = comm.all_gather(results)[0]
        if results:
            if not isinstance(results, dict):
                raise TypeError(f"The eval function must return a dict of results, got {type(results).__name__}.")
            flattened = flatten_results_dict(results)
            for name, value in flattened.items():
                try:
                    flattened[name] = float(value)
                except (TypeError, ValueError) as e:
                    raise ValueError(
                        f"Evaluation result {name}={value!r} is not a number; the eval function must return a "
                        "dict of dicts of numbers."
                    ) from e
            if put:
                self.trainer.storage.put_scalars(**flattened, smoothing_hint=False)
        # Evaluation may take different times on different ranks: meet before training continues.
        comm.synchronize()

    def before_train(self) -> None:
        self._evaluated_final = self._evaluated_final and self.trainer.start_iter >= self.trainer.max_iter

    def after_step(self) -> None:
        it, max_iter = self.trainer.iter, self.trainer.max_iter
        if period_fires(self._period, it, max_iter if self._eval_after_train else None):
            _flush_trainer_metrics(self.trainer)
            self._do_eval()
            self._evaluated_final = it == max_iter - 1

    def after_train(self) -> None:
        # A resumed run that had no iteration left still evaluates the final model, for train()'s results.
        # When its checkpoint was taken after the final evaluation (killed during the final save), the
        # storage already holds the results at the last iteration: put nothing, as the uninterrupted run did.
        t = self.trainer
        if self._eval_after_train and t.iter == t.max_iter and t.start_iter == t.max_iter:
            self._do_eval(put=not self._evaluated_final)
        # The function usually closes over big objects (model, data): release them once training is over.
        self._func = None  # type: ignore[assignment]

    def state_dict(self) -> Dict[str, Any]:
        return {"evaluated_final": self._evaluated_final}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._evaluated_final = bool(state_dict["evaluated_final"])


class TorchProfiler(HookBase):
    """Profiles chosen iterations with ``torch.profiler`` and writes their traces (as detectron2's hook).

    For each iteration where ``enable_predicate(trainer)`` is true, the profiler runs from this hook's
    ``before_step`` to its ``after_step``: register it first to cover the whole step (and the other hooks'
    ``before_step``). Then it writes, on the main process only (the others are not profiled):

    - with ``save_tensorboard``: a trace for TensorBoard's profiler plugin in
      ``{output_dir}/log/profiler-tensorboard-iter{N}/``;
    - otherwise: a Chrome trace ``{output_dir}/profiler-trace-iter{N}.json`` (open it in ``chrome://tracing``
      or Perfetto).

    Profiling records shapes, memory, stacks and FLOPs: a profiled iteration is much slower than others, so
    profile a few, e.g. ``enable_predicate=lambda t: t.iter in (100, 101)``.

    Args:
        enable_predicate: called with the trainer before each iteration; True profiles the iteration.
        output_dir: where the traces go.
        activities: ``torch.profiler.ProfilerActivity`` values; None: every one available (CPU, CUDA, ...).
        save_tensorboard: write a TensorBoard trace instead of a Chrome trace file.
    """

    def __init__(
        self,
        enable_predicate: Callable[[Any], bool],
        output_dir: str,
        *,
        activities: Optional[Sequence[Any]] = None,
        save_tensorboard: bool = True,
    ) -> None:
        self._enable_predicate = enable_predicate
        self._output_dir = os.fspath(output_dir)
        self._activities = activities
        self._save_tensorboard = save_tensorboard
        self._profiler: Optional[torch.profiler.profile] = None

    def before_step(self) -> None:
        if not comm.is_main_process() or not self._enable_predicate(self.trainer):
            return
        on_trace_ready = None
        if self._save_tensorboard:
            folder = os.path.join(self._output_dir, "log", f"profiler-tensorboard-iter{self.trainer.iter}")
            on_trace_ready = torch.profiler.tensorboard_trace_handler(folder, f"worker{comm.get_rank()}")
        self._profiler = torch.profiler.profile(
            activities=self._activities,
            on_trace_ready=on_trace_ready,
            record_shapes=True,
            profile_memory=True,
            with_stack=True,
            with_flops=True,
        )
        self._profiler.__enter__()

    def after_step(self) -> None:
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)  # calls on_trace_ready: writes the TensorBoard trace
        if not self._save_tensorboard:
            os.makedirs(self._output_dir, exist_ok=True)
            path = os.path.join(self._output_dir, f"profiler-trace-iter{self.trainer.iter}.json")
            profiler.export_chrome_trace(path)
            logger.info("TorchProfiler: wrote the trace of iteration %d to %s", self.trainer.iter, path)

    def after_train(self) -> None:
        # A step that raised left the profiler running: stop it without writing a partial trace.
        if self._profiler is not None:
            profiler, self._profiler = self._profiler, None
            profiler.on_trace_ready = None
            profiler.__exit__(None, None, None)

"""EventStorage, the one channel for metrics, and the writers that write it out.

Models, trainers and hooks ``put_*`` values into the current :class:`EventStorage`; :class:`EventWriter` s read
it periodically and write JSON lines, TensorBoard events or console lines. Nobody reaches into anybody else.

Two properties matter for speed and for long runs:

* A scalar put as a tensor stays a tensor (on its device) until something reads it; all pending tensors then
  move to the host together, one transfer per device. Putting never forces a host sync. A number goes into
  the history at once (only behind a pending tensor of its own name), so that a hook reading it with
  :meth:`EventStorage.latest_value` sees it in the same iteration, with no transfer.
* History is bounded: each name keeps its last ``max_length`` values (plus an exact running sum for
  ``global_avg``), so memory does not grow with the number of iterations.
"""
import datetime
import json
import logging
import operator
import os
import statistics
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from functools import reduce
from itertools import islice
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "HistoryBuffer",
    "EventStorage",
    "get_event_storage",
    "has_event_storage",
    "EventWriter",
    "JSONWriter",
    "TensorboardXWriter",
    "CommonMetricPrinter",
    "CSVWriter",
]

logger = logging.getLogger(__name__)

_CURRENT_STORAGE_STACK: List["EventStorage"] = []

Scalar = Union[float, int, torch.Tensor]


class HistoryBuffer:
    """The bounded history of one scalar, with fvcore ``HistoryBuffer``'s methods.

    Keeps the last ``max_length`` ``(value, iteration)`` pairs; ``global_avg`` covers every value ever put
    (it is the running sum divided by the count, not an average of the kept window).
    """

    def __init__(self, max_length: int = 1000) -> None:
        self._max_length = max_length
        # Values and their iterations side by side (not as pairs): a put appends two numbers and allocates
        # nothing, and a window of values is one C-level slice.
        self._values: deque = deque(maxlen=max_length)
        self._iterations: deque = deque(maxlen=max_length)
        self._count = 0
        self._global_sum = 0.0

    def update(self, value: float, iteration: Optional[float] = None) -> None:
        """Appends ``value``; ``iteration`` defaults to the number of values put so far."""
        if iteration is None:
            iteration = self._count
        self._values.append(value)
        self._iterations.append(iteration)
        self._count += 1
        self._global_sum += value

    def extend(self, values: Sequence[float], iterations: Sequence[float]) -> None:
        """Appends several values with their iterations (the same as :meth:`update` for each, in order)."""
        if len(values) != len(iterations):
            raise ValueError(f"extend() got {len(values)} values for {len(iterations)} iterations")
        self._values.extend(values)
        self._iterations.extend(iterations)
        self._count += len(values)
        # One by one, in order (not sum(), which compensates on Python >= 3.12): the sum update() would give.
        self._global_sum = reduce(operator.add, values, self._global_sum)

    def latest(self) -> float:
        """The newest value."""
        return self._values[-1]

    def values_tail(self) -> Tuple[float, float]:
        """The newest ``(value, iteration)`` pair."""
        return self._values[-1], self._iterations[-1]

    def count_in_last_iters(self, window_size: int) -> int:
        """How many of the kept values were put in the last ``window_size`` iterations, counting back from the
        newest value's iteration."""
        if not self._iterations:
            return 0
        since = self._iterations[-1] - window_size
        count = 0
        for itr in reversed(self._iterations):
            if itr <= since:
                break
            count += 1
        return count

    def _window(self, window_size: int) -> List[float]:
        return list(islice(reversed(self._values), window_size))

    # statistics' pure-Python median and mean are several times faster than numpy's on these short lists.
    def median(self, window_size: int) -> float:
        """Median of the last ``window_size`` values."""
        return float(statistics.median(self._window(window_size)))

    def avg(self, window_size: int) -> float:
        """Mean of the last ``window_size`` values."""
        window = self._window(window_size)
        return sum(window) / len(window)

    def global_avg(self) -> float:
        """Mean of every value ever put, including those no longer kept."""
        return self._global_sum / self._count

    def global_count(self) -> int:
        """How many values were ever put."""
        return self._count

    def values(self) -> List[Tuple[float, float]]:
        """The kept ``(value, iteration)`` pairs, oldest first."""
        return list(zip(self._values, self._iterations))

    def state_dict(self) -> Dict[str, Any]:
        """The kept values and the running count and sum (plain Python data)."""
        return {
            "values": list(self._values),
            "iterations": list(self._iterations),
            "count": self._count,
            "sum": self._global_sum,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""
        self._values.clear()
        self._iterations.clear()
        self._values.extend(state["values"])
        self._iterations.extend(state["iterations"])
        self._count = state["count"]
        self._global_sum = state["sum"]


def get_event_storage() -> "EventStorage":
    """Returns the current :class:`EventStorage` (the innermost ``with EventStorage(...)``).

    Raises:
        RuntimeError: when called outside any EventStorage context.
    """
    if not _CURRENT_STORAGE_STACK:
        raise RuntimeError(
            "get_event_storage() was called outside an EventStorage: there is no current storage. "
            "Call it during training (the trainer opens one), or wrap your code in "
            "`with EventStorage(start_iter):`."
        )
    return _CURRENT_STORAGE_STACK[-1]


def has_event_storage() -> bool:
    """True when an EventStorage is current."""
    return bool(_CURRENT_STORAGE_STACK)


class EventStorage:
    """Per-iteration metrics, images and histograms of a training run.

    Use it as a context manager: inside ``with EventStorage(start_iter) as storage:``,
    :func:`get_event_storage` returns it.

    Args:
        start_iter: the iteration the storage starts at.
        max_history: values kept per scalar name (older ones only count towards ``global_avg``).
    """

    # Pending tensor values are forced to the host at the latest when this many are waiting, so that a
    # storage that nobody reads still has bounded memory.
    MAX_PENDING = 10000

    def __init__(self, start_iter: int = 0, max_history: int = 1000) -> None:
        self._max_history = max_history
        self._history: Dict[str, HistoryBuffer] = {}
        self._smoothing_hints: Dict[str, bool] = {}
        self._latest_scalars: Dict[str, Tuple[float, int]] = {}
        self._pending: List[Tuple[str, Scalar, int]] = []
        self._pending_names: set = set()  # the names with a tensor in _pending
        self._iter = start_iter
        self.start_iter = start_iter
        self._current_prefix = ""
        self._vis_data: List[Tuple[str, torch.Tensor, int]] = []
        self._histograms: List[Dict[str, Any]] = []

    # ---- putting -------------------------------------------------------------------------------------------
    def put_scalar(self, name: str, value: Scalar, smoothing_hint: bool = True, cur_iter: Optional[int] = None) -> None:
        """Adds a scalar for the current (or the given) iteration.

        Args:
            name: the metric's name (prefixed by the current :meth:`name_scope`).
            value: a Python number or a one-element tensor. A tensor is not moved to the host here.
            smoothing_hint: whether writers should smooth this metric (median over a window) or write the raw
                latest value. It must be the same every time a name is put.
            cur_iter: the iteration the value belongs to; the storage's current iteration by default.
        """
        name = self._current_prefix + name
        cur_iter = self._iter if cur_iter is None else int(cur_iter)
        if self._smoothing_hints.get(name) is not smoothing_hint:  # inlined: this runs several times a step
            self._check_hint(name, bool(smoothing_hint))
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"put_scalar({name!r}) needs a number or a one-element tensor, got a tensor of shape "
                    f"{tuple(value.shape)}; reduce it first (e.g. .mean()) or use put_histogram."
                )
            # A snapshot (a device-side copy, no sync): the caller may change the tensor in place later, as
            # GradScaler.update() does to its scale.
            self._pending.append((name, value.detach().clone(), cur_iter))
            self._pending_names.add(name)
        elif name in self._pending_names:
            # Keep the order of one name's values: a number put after a pending tensor waits behind it.
            self._pending.append((name, float(value), cur_iter))
        else:
            value = float(value)
            buf = self._history.get(name)
            if buf is None:
                buf = self._history[name] = HistoryBuffer(self._max_history)
            buf.update(value, cur_iter)
            self._latest_scalars[name] = (value, cur_iter)
            return
        if len(self._pending) >= self.MAX_PENDING:
            self._materialize()

    def put_scalars(self, *, smoothing_hint: bool = True, cur_iter: Optional[int] = None, **kwargs: Scalar) -> None:
        """Puts several scalars: ``storage.put_scalars(loss=0.5, accuracy=0.9)``."""
        for k, v in kwargs.items():
            self.put_scalar(k, v, smoothing_hint=smoothing_hint, cur_iter=cur_iter)

    def put_scalar_series(
        self, name: str, values: Sequence[float], iterations: Sequence[int], smoothing_hint: bool = True
    ) -> None:
        """Puts numbers of one scalar for several iterations at once (the trainer's batched metrics).

        Same as ``put_scalar(name, v, smoothing_hint, cur_iter=i)`` for each pair in order, but cheaper.
        """
        if self._current_prefix + name in self._pending_names or not values:
            for value, itr in zip(values, iterations):
                self.put_scalar(name, value, smoothing_hint, cur_iter=itr)
            return
        name = self._current_prefix + name
        self._check_hint(name, smoothing_hint)
        buf = self._buffer(name)
        buf.extend(list(map(float, values)), iterations)
        self._latest_scalars[name] = buf.values_tail()

    def _check_hint(self, name: str, smoothing_hint: bool) -> None:
        hint = self._smoothing_hints.setdefault(name, smoothing_hint)
        if hint != smoothing_hint:
            raise ValueError(
                f"Scalar {name!r} was put with smoothing_hint={hint} before and smoothing_hint={smoothing_hint} "
                "now; a name must always use the same hint."
            )

    def put_image(self, img_name: str, img_tensor: torch.Tensor) -> None:
        """Adds an image (CHW; float in [0, 1] or uint8 in [0, 255]) for the TensorBoard writer."""
        self._vis_data.append((self._current_prefix + img_name, img_tensor, self._iter))

    def put_histogram(self, hist_name: str, hist_tensor: torch.Tensor, bins: int = 1000) -> None:
        """Adds a histogram of the values of ``hist_tensor`` (computed now, on the host)."""
        values = hist_tensor.detach().reshape(-1).float().cpu()
        vmin, vmax = float(values.min()), float(values.max())
        counts = torch.histc(values, bins=bins, min=vmin, max=vmax)
        edges = torch.linspace(vmin, vmax, steps=bins + 1)
        self._histograms.append(
            dict(
                tag=self._current_prefix + hist_name,
                min=vmin,
                max=vmax,
                num=len(values),
                sum=float(values.sum()),
                sum_squares=float((values**2).sum()),
                bucket_limits=edges[1:].tolist(),
                bucket_counts=counts.tolist(),
                global_step=self._iter,
            )
        )

    def _buffer(self, name: str) -> HistoryBuffer:
        buf = self._history.get(name)
        if buf is None:
            buf = self._history[name] = HistoryBuffer(self._max_history)
        return buf

    def _add(self, name: str, value: float, cur_iter: int) -> None:
        self._buffer(name).update(value, cur_iter)
        self._latest_scalars[name] = (value, cur_iter)

    def _materialize(self) -> None:
        # Moves every pending tensor to the host: one stack and one transfer per device.
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._pending_names.clear()
        by_device: Dict[torch.device, List[int]] = defaultdict(list)
        for i, (_, v, _) in enumerate(pending):
            if isinstance(v, torch.Tensor):
                by_device[v.device].append(i)
        host: Dict[int, float] = {}
        for device, idx in by_device.items():
            tensors = [pending[i][1].reshape(()) for i in idx]
            # float64 keeps float64 values and integers up to 2**53 exact; float32 is exact for the rest.
            wide = any(t.dtype == torch.float64 or not t.is_floating_point() for t in tensors)
            dtype = torch.float64 if wide and device.type != "mps" else torch.float32  # MPS has no float64
            host.update(zip(idx, torch.stack([t.to(dtype) for t in tensors]).tolist()))
        for i, (name, v, it) in enumerate(pending):
            self._add(name, host[i] if i in host else v, it)

    # ---- reading -------------------------------------------------------------------------------------------
    def history(self, name: str) -> HistoryBuffer:
        """The :class:`HistoryBuffer` of ``name``.

        Raises:
            KeyError: when nothing was put under ``name``.
        """
        self._materialize()
        ret = self._history.get(name)
        if ret is None:
            raise KeyError(f"No history metric available for {name!r}; known: {sorted(self._history)}")
        return ret

    def histories(self) -> Dict[str, HistoryBuffer]:
        """Every name's :class:`HistoryBuffer`."""
        self._materialize()
        return self._history

    def latest(self) -> Dict[str, Tuple[float, int]]:
        """``{name: (latest value, iteration it was put at)}``."""
        self._materialize()
        return self._latest_scalars

    def latest_value(self, name: str) -> Optional[Tuple[float, int]]:
        """The newest value of ``name`` and the iteration it was put at, or None when nothing was put under it.

        Cheap enough for every step: it moves pending tensors to the host only when one of them is of this
        name. It reads the history, so a value restored from a checkpoint counts.
        """
        if name in self._pending_names:
            self._materialize()
        buf = self._history.get(name)
        return None if buf is None else buf.values_tail()

    def changed_since(self, name: str, iteration: int) -> bool:
        """Whether a value of ``name`` was put at an iteration later than ``iteration``."""
        latest = self.latest_value(name)
        return latest is not None and latest[1] > iteration

    def count_samples(self, name: str, window_size: int = 20) -> int:
        """How many values of ``name`` were put in the last ``window_size`` iterations: those put at an iteration
        later than ``latest iteration of name - window_size``. A metric put every other iteration counts half of
        ``window_size``.

        Raises:
            KeyError: when nothing was put under ``name``.
        """
        return self.history(name).count_in_last_iters(window_size)

    def latest_with_smoothing_hint(self, window_size: int = 20) -> Dict[str, Tuple[float, int]]:
        """Like :meth:`latest`, but a metric with a smoothing hint gives the median of the values put in its last
        ``window_size`` iterations (:meth:`count_samples`), not of its last ``window_size`` values: a metric put
        every 5 iterations is smoothed over 20 iterations too, as in detectron2. The writers use it."""
        self._materialize()
        result = {}
        for name, (v, itr) in self._latest_scalars.items():
            if self._smoothing_hints[name]:
                buf = self._history[name]
                v = buf.median(buf.count_in_last_iters(window_size))
            result[name] = (v, itr)
        return result

    def smoothing_hints(self) -> Dict[str, bool]:
        """``{name: smoothing_hint}`` for every scalar name."""
        return self._smoothing_hints

    # ---- saving and restoring ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The scalar histories (bounded) and smoothing hints, so that a resumed run's smoothed metrics and
        global averages continue exactly. Images and histograms are not included. The latest value of each
        name is the tail of its history, restored with it: a writer of the resumed run writes the values put
        after its last write (see :meth:`EventWriter.continue_after`)."""
        self._materialize()
        return {
            "history": {name: buf.state_dict() for name, buf in self._history.items()},
            "smoothing_hints": dict(self._smoothing_hints),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores the histories saved by :meth:`state_dict` (before anything is put)."""
        for name, buf_state in state["history"].items():
            buf = self._buffer(name)
            buf.load_state_dict(buf_state)
            if buf_state["values"]:
                self._latest_scalars[name] = buf.values_tail()
        self._smoothing_hints.update(state["smoothing_hints"])

    # ---- iteration and scoping -----------------------------------------------------------------------------
    def step(self) -> None:
        """Advances the current iteration by one."""
        self._iter += 1

    @property
    def iter(self) -> int:
        """The current iteration; new values are put at it by default. The trainer sets it every step."""
        return self._iter

    @iter.setter
    def iter(self, val: int) -> None:
        self._iter = int(val)

    @property
    def iteration(self) -> int:
        """Alias of :attr:`iter`, kept for detectron2 compatibility."""
        return self._iter

    @contextmanager
    def name_scope(self, name: str) -> Iterator[None]:
        """Prefixes names put inside the context with ``name/``."""
        old_prefix = self._current_prefix
        self._current_prefix = old_prefix + name.rstrip("/") + "/"
        try:
            yield
        finally:
            self._current_prefix = old_prefix

    def images(self) -> List[Tuple[str, torch.Tensor, int]]:
        """The images put since the last :meth:`clear_images`, as ``(name, CHW tensor, iteration)``."""
        return self._vis_data

    def histograms(self) -> List[Dict[str, Any]]:
        """The histograms put since the last :meth:`clear_histograms`, as keyword arguments of TensorBoard's
        ``SummaryWriter.add_histogram_raw``."""
        return self._histograms

    def clear_images(self) -> None:
        """Drops the stored images (writers call it once they wrote them)."""
        self._vis_data = []

    def clear_histograms(self) -> None:
        """Drops the stored histograms (writers call it once they wrote them)."""
        self._histograms = []

    def __enter__(self) -> "EventStorage":
        _CURRENT_STORAGE_STACK.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert _CURRENT_STORAGE_STACK[-1] is self, "EventStorage contexts must be exited in LIFO order"
        _CURRENT_STORAGE_STACK.pop()


class EventWriter:
    """Base class of the writers: ``write()`` reads the current storage and writes; ``close()`` releases."""

    _continue_after: Optional[int] = None

    def write(self) -> None:
        raise NotImplementedError

    def continue_after(self, iteration: int) -> None:
        """Called before the first write of a resumed run: this writer's output holds what it wrote up to
        ``iteration`` (its last write before the checkpoint); it must drop what it wrote later and write the
        values put after ``iteration`` again. :class:`~trainkit.engine.hooks.PeriodicWriter` calls it. Without
        a call, a resumed run writes from ``storage.start_iter`` on. Writers that keep no output of their own
        (the console) can ignore it; the others read :meth:`_kept_through` when they open their output."""
        self._continue_after = iteration

    def _kept_through(self, start_iter: int) -> int:
        """The last iteration whose output a run starting at ``start_iter`` keeps (see :meth:`continue_after`)."""
        return start_iter - 1 if self._continue_after is None else self._continue_after

    def state_dict(self) -> Dict[str, Any]:
        """What this writer needs after a resume (plain data; e.g. a tracker's run id). PeriodicWriter saves it
        with its own state in the checkpoint. Nothing by default."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned, before the first write of the resumed run."""

    def close(self) -> None:
        pass


def _new_scalars_by_iter(storage: EventStorage, window_size: int, after: int) -> Dict[int, Dict[str, float]]:
    # The (smoothed) latest scalars put at iterations later than `after`, grouped by iteration.
    by_iter: Dict[int, Dict[str, float]] = defaultdict(dict)
    for name, (value, itr) in storage.latest_with_smoothing_hint(window_size).items():
        if itr > after:
            by_iter[itr][name] = value
    return dict(sorted(by_iter.items()))


def _keep_old_file(path: str) -> str:
    """Moves ``path`` (an earlier run's output) to ``<path>.<n>.bak`` with the first free ``n``; returns that.

    What the file writers do when a run starts at iteration 0 over a non-empty file of theirs.
    """
    n = 1
    while os.path.exists(f"{path}.{n}.bak"):
        n += 1
    os.replace(path, f"{path}.{n}.bak")
    logger.warning("%s existed; training starts at iteration 0, so it was moved to %s.bak", path, f"{path}.{n}")
    return f"{path}.{n}.bak"


# json.dumps(..., sort_keys=True) would build a new encoder for every line.
_JSON_ENCODER = json.JSONEncoder(sort_keys=True)


class JSONWriter(EventWriter):
    """Appends one JSON object per line per iteration to ``json_file``, with an ``"iteration"`` key.

    Each write adds the scalars put since the previous write, so an iteration never appears twice. Every
    write is one ``write()`` call of whole lines followed by a flush, so a process killed at any moment
    leaves whole lines in the file (the kernel has them; only a power cut could lose the newest ones).

    The file is opened at the first write, when the storage's ``start_iter`` is known:

    * resuming (``start_iter > 0``): lines of iterations after the last write before the checkpoint (see
      :meth:`EventWriter.continue_after`; ``start_iter - 1`` without it) are dropped, and so is a trailing
      partial line: a run killed after its last checkpoint wrote them, and the resumed run writes them again;
    * starting from iteration 0 over an existing non-empty file: the old file is kept as
      ``<json_file>.<n>.bak`` and a new one started.

    Args:
        json_file: path of the file.
        window_size: window of the median for metrics with a smoothing hint.
    """

    def __init__(self, json_file: str, window_size: int = 20) -> None:
        self._path = json_file
        self._file_handle: Optional[Any] = None
        self._window_size = window_size
        self._last_write = -1

    def _open(self, start_iter: int) -> None:
        kept = self._kept_through(start_iter)
        if os.path.exists(self._path) and os.path.getsize(self._path) > 0:
            if start_iter > 0:
                self._drop_lines_from(kept + 1)
            else:
                _keep_old_file(self._path)
        self._file_handle = open(self._path, "a")
        # The file now ends at `kept`: write what was put after it (a reused writer writes from there again).
        self._last_write = kept
        self._continue_after = None

    def _drop_lines_from(self, start_iter: int) -> None:
        with open(self._path) as f:
            text = f.read()
        lines = text.split("\n")
        kept = []
        for line in lines:
            try:
                if json.loads(line)["iteration"] < start_iter:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a crash, or not ours
        if len(kept) != sum(1 for line in lines if line) or not text.endswith("\n"):
            logger.info("%s: keeping the %d lines before iteration %d (the resumed run writes the rest again).",
                        self._path, len(kept), start_iter)
            tmp = f"{self._path}.tmp"
            with open(tmp, "w") as f:
                f.write("".join(kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)

    def write(self) -> None:
        storage = get_event_storage()
        if self._file_handle is None:
            self._open(storage.start_iter)
        new = _new_scalars_by_iter(storage, self._window_size, self._last_write)
        if not new:
            return
        lines = "".join(_JSON_ENCODER.encode({**scalars, "iteration": itr}) + "\n" for itr, scalars in new.items())
        self._file_handle.write(lines)
        self._file_handle.flush()
        self._last_write = max(new)

    def close(self) -> None:
        # A later write (a second train() with the same writers) opens the file again, as the first write did.
        if self._file_handle is not None:
            self._file_handle.close()
            self._file_handle = None


class TensorboardXWriter(EventWriter):
    """Writes scalars, images and histograms to TensorBoard event files in ``log_dir``.

    No file is created until there is something to write. ``_writer`` is the underlying
    ``torch.utils.tensorboard.SummaryWriter``, created at its first use, as in detectron2: code may write to it
    directly (``writer._writer.add_text(...)``).

    Args:
        log_dir: the folder of the event files.
        window_size: window of the median for metrics with a smoothing hint, in iterations.
        kwargs: passed to ``torch.utils.tensorboard.SummaryWriter``.
    """

    def __init__(self, log_dir: str, window_size: int = 20, **kwargs: Any) -> None:
        self._log_dir = log_dir
        self._kwargs = kwargs
        self._window_size = window_size
        self._summary_writer: Optional[Any] = None
        self._last_write: Optional[int] = None  # None until the run's first write is due

    def _start(self, start_iter: int) -> None:
        # A resumed run keeps what the interrupted run wrote up to its last write before the checkpoint (see
        # EventWriter.continue_after) and writes the later steps again.
        self._last_write = self._kept_through(start_iter) if start_iter > 0 else -1
        self._continue_after = None

    @property
    def _writer(self) -> Any:
        if self._summary_writer is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            if self._last_write is None and has_event_storage():
                self._start(get_event_storage().start_iter)
            kwargs = dict(self._kwargs)
            if self._last_write is not None and self._last_write >= 0:
                kwargs.setdefault("purge_step", self._last_write + 1)  # TensorBoard hides the later steps
            self._summary_writer = SummaryWriter(self._log_dir, **kwargs)
        return self._summary_writer

    def write(self) -> None:
        storage = get_event_storage()
        if self._last_write is None:
            self._start(storage.start_iter)
        new = _new_scalars_by_iter(storage, self._window_size, self._last_write)
        images, histograms = storage.images(), storage.histograms()
        if not (new or images or histograms):
            return
        writer = self._writer
        for itr, scalars in new.items():
            for name, value in scalars.items():
                writer.add_scalar(name, value, itr)
        if new:
            self._last_write = max(new)
        for img_name, img, step_num in images:
            writer.add_image(img_name, img, step_num)
        storage.clear_images()
        for params in histograms:
            writer.add_histogram_raw(**params)
        storage.clear_histograms()
        writer.flush()

    def close(self) -> None:
        # A later write (a second train() with the same writers) opens a new event file.
        if self._summary_writer is not None:
            self._summary_writer.close()
            self._summary_writer = None
        self._last_write = None


class CommonMetricPrinter(EventWriter):
    """Logs the common metrics of a training iteration to the console: ETA, iteration, each loss (smoothed),
    time, data_time, lr, and max memory on CUDA.

    The losses are medians, and ``time`` and ``data_time`` means, over the values put in the last
    ``window_size`` iterations (see :meth:`EventStorage.count_samples`).

    Args:
        max_iter: the iteration training ends at; without it, no ETA is printed.
        window_size: window of the medians and averages, in iterations.

    Attributes:
        logger: the logger the lines go to (``trainkit.utils.events``); replace it to send them elsewhere.
    """

    def __init__(self, max_iter: Optional[int] = None, window_size: int = 20) -> None:
        self.logger = logging.getLogger(__name__)
        self._max_iter = max_iter
        self._window_size = window_size
        self._last_write: Optional[Tuple[int, float]] = None  # (iteration, wall time) of the previous write

    def _eta(self, storage: EventStorage, iteration: int) -> Optional[str]:
        if self._max_iter is None:
            return None
        remaining = self._max_iter - iteration - 1
        hist = storage.histories().get("time")
        if hist is not None and hist.global_count() > 0:
            seconds = hist.median(1000) * remaining
            storage.put_scalar("eta_seconds", seconds, smoothing_hint=False)
        elif self._last_write is not None and iteration > self._last_write[0]:
            # No IterationTimer: estimate from the wall time between two writes.
            per_iter = (time.perf_counter() - self._last_write[1]) / (iteration - self._last_write[0])
            seconds = per_iter * remaining
        else:
            seconds = None
        self._last_write = (iteration, time.perf_counter())
        return None if seconds is None else str(datetime.timedelta(seconds=int(seconds)))

    def write(self) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return  # nobody would see the line: do not compute it
        storage = get_event_storage()
        iteration = storage.iter
        if self._max_iter is not None and iteration >= self._max_iter:
            return  # training already ended; after_train writes once more and has nothing new to say
        histories = storage.histories()
        w = self._window_size

        def fmt(name: str, spec: str) -> str:
            if name not in histories:
                return ""
            h = histories[name]
            return f"{name}: {h.avg(h.count_in_last_iters(w)):{spec}}  "

        eta = self._eta(storage, iteration)
        losses = "  ".join(
            f"{k}: {h.median(h.count_in_last_iters(w)):.4g}"
            for k, h in histories.items()
            if "loss" in k and storage.smoothing_hints()[k]
        )
        lr = f"lr: {histories['lr'].latest():.5g}  " if "lr" in histories else ""
        mem = ""
        if torch.cuda.is_available():
            mem = f"max_mem: {torch.cuda.max_memory_allocated() / 1024 / 1024:.0f}M"
        self.logger.info(
            " %siter: %d  %s  %s%s%s%s",
            f"eta: {eta}  " if eta else "",
            iteration,
            losses,
            fmt("time", ".4f"),
            fmt("data_time", ".4f"),
            lr,
            mem,
        )


def __getattr__(name: str) -> Any:
    # CSVWriter lives in its own module (this one is long), which imports EventWriter from here: importing
    # it on first use lets either module be imported first.
    if name == "CSVWriter":
        from trainkit.utils.csv_writer import CSVWriter

        return CSVWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

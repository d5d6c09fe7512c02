"""Async checkpoint saving: a host-memory snapshot of the state, written by one background thread.

Training stalls only for :func:`snapshot_to_host`, which copies every tensor of the state into host memory that
the training step never touches (pinned memory for CUDA tensors, so the copy runs at full bus speed).
:class:`BackgroundWriter` then runs the write (the same atomic protocol as a blocking save) in a thread. It runs
one write at a time: the next save first waits for the previous one, so at most one snapshot is alive and
memory stays bounded at one copy of the state. That copy is kept and overwritten in place by the next save, as
torchtitan keeps its pinned state dict: allocating fresh memory each time costs several times the copy itself
(benchmarks/README.md). An error of the write is kept and raised in the training thread at the next
:meth:`BackgroundWriter.wait` (the next save, or the end of training).

A thread, not a process: a process would need the snapshot copied again into shared memory, and the write
is mostly file I/O, which runs outside the GIL.
"""
import copy
import logging
import threading
import time
from typing import Any, Callable, Optional

import torch

from .serialization import CheckpointError

__all__ = ["BackgroundSaveError", "BackgroundWriter", "snapshot_to_host"]

logger = logging.getLogger(__name__)


class BackgroundSaveError(CheckpointError):
    """A checkpoint written in the background failed (disk full, permission denied, ...); names the file."""


def snapshot_to_host(obj: Any, reuse: Any = None) -> Any:
    """A copy of ``obj`` that shares no tensor memory and no mutable container with it.

    Tensors are copied to host memory (into pinned memory when they live on a GPU, with one device
    synchronisation at the end); dicts, lists, tuples and sets are rebuilt; other values are deep-copied (they
    are small: numbers, strings, the config's text). Training may then change the live state freely while the
    copy is written.

    Args:
        obj: a checkpoint's data, e.g. ``{"model": state_dict, "trainer": {...}, "iteration": 99}``.
        reuse: an earlier snapshot that nothing reads any more. Its tensors are overwritten in place where the
            new state has a tensor of the same shape and dtype at the same place, which avoids allocating
            (and page-faulting, or pinning) fresh memory: several times faster than a fresh copy on CPU.

    Returns:
        The copy, with every tensor on the CPU.
    """
    on_gpu = [False]
    copied = _copy(obj, reuse, on_gpu)
    if on_gpu[0]:
        torch.cuda.synchronize()  # the non-blocking device-to-host copies must land before the writer reads
    return copied


def _copy(value: Any, reuse: Any, on_gpu: list) -> Any:
    if isinstance(value, torch.Tensor):
        return _copy_tensor(value.detach(), reuse, on_gpu)
    if isinstance(value, dict):
        # type(value)() keeps OrderedDict (a model's state_dict) an OrderedDict.
        out = type(value)()
        old = reuse if isinstance(reuse, dict) else {}
        for key, item in value.items():
            out[key] = _copy(item, old.get(key), on_gpu)
        return out
    if type(value) in (list, tuple):
        old = reuse if type(reuse) is type(value) and len(reuse) == len(value) else [None] * len(value)
        return type(value)(_copy(item, previous, on_gpu) for item, previous in zip(value, old))
    if type(value) is set:
        return {_copy(item, None, on_gpu) for item in value}
    return copy.deepcopy(value)


def _copy_tensor(tensor: torch.Tensor, reuse: Any, on_gpu: list) -> torch.Tensor:
    cuda = tensor.device.type == "cuda" and torch.cuda.is_available()
    reusable = (
        isinstance(reuse, torch.Tensor)
        and reuse.size() == tensor.size()
        and reuse.dtype == tensor.dtype
        and reuse.is_contiguous()
        and (reuse.is_pinned() if cuda else True)
    )
    if not reusable and not cuda:
        return tensor.to("cpu", copy=True)
    host = reuse if reusable else torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=cuda)
    host.copy_(tensor, non_blocking=cuda)
    on_gpu[0] = on_gpu[0] or cuda
    return host


class BackgroundWriter:
    """Runs one write at a time in a background thread and hands its error to the caller's thread.

    Example::

        writer = BackgroundWriter()
        writer.start(lambda: atomic_save(snapshot, path), path)
        ...                    # training goes on
        writer.wait()          # raises BackgroundSaveError if the write failed
    """

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._path = ""
        self._error: Optional[BaseException] = None

    @property
    def busy(self) -> bool:
        """Whether a write is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, write: Callable[[], None], path: str) -> None:
        """Waits for the write in flight (if any), then runs ``write()`` in a new thread.

        Args:
            write: does the whole write (file, tag, pruning).
            path: the file it writes, for the log and the error message.

        Raises:
            BackgroundSaveError: the previous write failed; ``write`` was not started.
        """
        self.wait()
        self._path = path
        # Not a daemon: a process that ends while a save is in flight finishes writing it first.
        self._thread = threading.Thread(target=self._run, args=(write,), name="trainkit-checkpoint-writer")
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        start = time.perf_counter()
        try:
            write()
        except BaseException as e:  # kept for the training thread: an error must never die with this thread
            self._error = e
            return
        logger.info("Saved checkpoint %s in the background in %.2f s.", self._path, time.perf_counter() - start)

    def wait(self) -> None:
        """Blocks until the write in flight is done (logging that it waited, and how long); raises its error, once.

        Raises:
            BackgroundSaveError: the write failed. The file it was writing is absent or was completed
                (never partial), and the ``last_checkpoint`` tag names a complete checkpoint.
        """
        if self.busy:
            logger.info("Waiting for the background save of %s to finish.", self._path)
            start = time.perf_counter()
            self._thread.join()
            logger.info("Waited %.2f s for the background save of %s.", time.perf_counter() - start, self._path)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise BackgroundSaveError(
                f"The background save of {self._path} failed: {type(error).__name__}: {error}. The last_checkpoint "
                "tag still names a complete checkpoint; fix the cause (free disk space, permissions) and run "
                "again with --resume."
            ) from error

"""Checkpointer: save and restore a model and its training state; PeriodicCheckpointer: save every N iterations.

The public names and signatures follow fvcore/detectron2 (``Checkpointer``, ``PeriodicCheckpointer``,
``resume_or_load``, the ``last_checkpoint`` tag), but the save and load paths differ in two ways that matter:
every file is written atomically (see :mod:`trainkit.checkpoint.serialization`), and every file is loaded with
``torch.load(weights_only=True)``, so a checkpoint can never run code.
"""
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .async_save import BackgroundWriter, snapshot_to_host
from .model_loading import load_model_state_dict, unwrap_model
from .serialization import (
    CheckpointError,
    atomic_save,
    atomic_write_text,
    check_weights_only_loadable,
    load_checkpoint_file,
    remove_stale_temp_files,
)

__all__ = ["Checkpointer", "PeriodicCheckpointer"]

logger = logging.getLogger(__name__)

_TAG_FILE = "last_checkpoint"


class Checkpointer:
    """Saves a model and any objects with ``state_dict()``/``load_state_dict()`` to ``{save_dir}/{name}.pth``.

    A checkpoint file holds ``{"model": model.state_dict(), <name>: obj.state_dict() for each checkpointable,
    **extra}``. The model is saved without the ``module.`` prefix of a DistributedDataParallel wrapper and
    loads into a wrapped or a plain model alike.

    Example::

        checkpointer = Checkpointer(model, "output", optimizer=optimizer, scheduler=scheduler)
        checkpointer.save("model_0000999", iteration=999)
        start_iter = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS).get("iteration", -1) + 1
    """

    def __init__(self, model: nn.Module, save_dir: str = "", *, save_to_disk: bool = True, **checkpointables: Any):
        """
        Args:
            model: the model; may be wrapped in DistributedDataParallel/DataParallel.
            save_dir: folder for checkpoint files and the ``last_checkpoint`` tag. Empty: never save.
            save_to_disk: whether this process writes files. Pass ``comm.is_main_process()`` in distributed
                runs, so that one process writes and every process can load.
            **checkpointables: other objects to save and restore, by name (optimizer, scheduler, trainer, ...).
        """
        self.model = model
        self.save_dir = os.fspath(save_dir)
        self.save_to_disk = save_to_disk
        self.checkpointables: Dict[str, Any] = {}
        for key, obj in checkpointables.items():
            self.add_checkpointable(key, obj)
        self._writer = BackgroundWriter()
        self._snapshot: Optional[Dict[str, Any]] = None  # the last async save's copy, overwritten by the next

    def add_checkpointable(self, key: str, checkpointable: Any) -> None:
        """Register one more object whose ``state_dict()`` is saved under ``key``."""
        if key == "model" or key in self.checkpointables:
            raise ValueError(f"Checkpointable name '{key}' is already used; pick another name.")
        for method in ("state_dict", "load_state_dict"):
            if not callable(getattr(checkpointable, method, None)):
                raise TypeError(
                    f"Checkpointable '{key}' ({type(checkpointable).__qualname__}) has no {method}() method; "
                    "only objects with state_dict() and load_state_dict() can be checkpointed."
                )
        self.checkpointables[key] = checkpointable

    # ----------------------------------------------------------------------------------------- saving

    def save(
        self,
        name: str,
        *,
        tag: bool = True,
        blocking: bool = True,
        on_written: Optional[Callable[[], None]] = None,
        **extra: Any,
    ) -> Optional[str]:
        """Write ``{save_dir}/{name}.pth`` atomically and (by default) tag it as the last checkpoint.

        Does nothing when ``save_dir`` is empty. With ``save_to_disk`` false it collects the state (so that
        collectives inside ``state_dict()`` meet on every process) but writes nothing, and never waits for a
        disk. Every save first waits for the background save in flight, if any (at most one is in flight).

        Args:
            name: file name without the ``.pth`` extension, e.g. ``"model_0000999"``.
            tag: point the ``last_checkpoint`` tag at this file. Pass False for side files, such as the best
                model so far, that a resumed run must not start from.
            blocking: True writes the file before returning. False copies the state to host memory (the only
                stall) and writes it in a background thread with the same atomic protocol; call :meth:`wait`
                before the process ends, or before reading the file.
            on_written: called (in the writer's thread when not blocking) after the file and its tag are in
                place, e.g. to prune old checkpoints.
            **extra: more data to store, e.g. ``iteration=999``; tensors and plain Python data only.

        Returns:
            The path written (or being written), or None when nothing is written.

        Raises:
            TypeError: something in the checkpoint would not load with ``weights_only=True``; nothing was
                written, so the previous checkpoint and tag stay as they were.
            BackgroundSaveError: the previous background save failed (the message names its file).
        """
        if not self.save_dir:
            return None
        if not name or os.path.basename(name) != name:
            raise ValueError(f"Checkpoint name must be a plain file name without folders, got '{name}'.")
        taken = sorted(set(extra) & ({"model"} | set(self.checkpointables)))
        if taken:
            raise ValueError(f"Extra data names {taken} clash with the model/checkpointable entries; rename them.")
        # Waiting before the state is collected keeps one snapshot alive at a time, and lets the previous
        # save's on_written (which may change a hook's state) finish before that state is read.
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self._writer.wait()  # a no-op on processes that do not write: they never start a background save
        # Every process collects the state, also those that do not write: a checkpointable's state_dict() may
        # be a collective (the trainer gathers every rank's RNG state), which all ranks must enter.
        data = {"model": unwrap_model(self.model).state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(extra)
        if not self.save_to_disk:
            return None
        check_weights_only_loadable(data, name=basename)
        os.makedirs(self.save_dir, exist_ok=True)
        if blocking:
            self._write(data, path, tag, on_written)
        else:
            # The previous snapshot is free to overwrite: its write finished before this save collected the state.
            snapshot = self._snapshot = snapshot_to_host(data, reuse=self._snapshot)
            del data
            self._writer.start(lambda: self._write(snapshot, path, tag, on_written), path)
        return path

    def _write(self, data: Dict[str, Any], path: str, tag: bool, on_written: Optional[Callable[[], None]]) -> None:
        remove_stale_temp_files(self.save_dir)
        logger.info("Saving checkpoint to %s", path)
        atomic_save(data, path)
        if tag:
            self.tag_last_checkpoint(os.path.basename(path))
        if on_written is not None:
            on_written()

    @property
    def saving(self) -> bool:
        """Whether a background save (``save(..., blocking=False)``) is in flight."""
        return self._writer.busy

    def wait(self) -> None:
        """Block until the background save in flight (if any) is written, tagged and pruned.

        Raises:
            BackgroundSaveError: that save failed; the message names its file and the cause. Raised once.
        """
        self._writer.wait()

    def checkpoint_basename(self, name: str) -> str:
        """The name of what :meth:`save` writes for ``name`` in ``save_dir``: the file ``{name}.pth``."""
        return f"{name}.pth"

    def delete_checkpoint(self, path: str) -> None:
        """Deletes a checkpoint that :meth:`save` wrote (a file here; a folder for sharded checkpoints)."""
        os.remove(path)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Atomically point ``{save_dir}/last_checkpoint`` at ``last_filename_basename``."""
        if not self.save_dir or not self.save_to_disk:
            return
        atomic_write_text(os.path.join(self.save_dir, _TAG_FILE), last_filename_basename)

    # ---------------------------------------------------------------------------------------- finding

    def get_checkpoint_file(self) -> str:
        """The path the ``last_checkpoint`` tag names, or ``""`` if there is no tag.

        Raises:
            CheckpointError: the tag is a folder, empty, not text, or names a file outside ``save_dir``. Each
                of these would otherwise start the run over (and overwrite its checkpoints) or load another
                run's file; the message names the tag and what to do.
        """
        if not self.save_dir:
            return ""
        tag = os.path.join(self.save_dir, _TAG_FILE)
        try:
            with open(tag, "rb") as f:
                raw = f.read(4096)
        except FileNotFoundError:
            return ""
        except IsADirectoryError:
            raise CheckpointError(self._bad_tag(tag, "is a folder, not the tag file")) from None
        try:
            last = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            last = None
        if last is None or not last.isprintable():
            raise CheckpointError(self._bad_tag(tag, "is not a text file"))
        if not last:
            raise CheckpointError(self._bad_tag(tag, "is empty"))
        if os.path.basename(last) != last or last in (".", ".."):
            raise CheckpointError(self._bad_tag(tag, f"names {last!r}, which is not a file in {self.save_dir!r}"))
        return os.path.join(self.save_dir, last)

    def _bad_tag(self, tag: str, problem: str) -> str:
        names = [os.path.basename(p) for p in self.get_all_checkpoint_files()]
        return (
            f"The last-checkpoint tag {tag} {problem}; it must hold the name of one checkpoint file in that folder. "
            f"Write the name of the checkpoint to resume from into it (the folder holds: {names or 'no .pth files'}), "
            "or move the folder away to start a new run."
        )

    def has_checkpoint(self) -> bool:
        """Whether ``save_dir`` has a ``last_checkpoint`` tag (the file it names may still be missing)."""
        return bool(self.get_checkpoint_file())

    def get_all_checkpoint_files(self) -> List[str]:
        """All ``.pth`` files in ``save_dir``, sorted by name (temporary files of unfinished saves excluded)."""
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return []
        paths = (os.path.join(self.save_dir, name) for name in os.listdir(self.save_dir))
        return sorted(
            path
            for path in paths
            if path.endswith(".pth") and not os.path.basename(path).startswith(".") and os.path.isfile(path)
        )

    # ---------------------------------------------------------------------------------------- loading

    def load(self, path: str, checkpointables: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """Restore the model and the named checkpointables from ``path``.

        The model loads non-strictly: tensors whose shape differs are skipped, and missing or unexpected keys
        are logged. A file without a ``"model"`` entry whose values are all tensors (``torch.save(
        model.state_dict())``) loads as model weights.

        A sharded checkpoint folder (of an FSDP run, see :mod:`trainkit.checkpoint.sharded`) loads its full
        model weights and plain extra data only; the trainer's state stays in the folder.

        Args:
            path: checkpoint file. Empty: log a warning, load nothing and return ``{}``.
            checkpointables: names of the checkpointables to restore; None restores all of them, ``[]`` only
                the model. A name the file lacks is skipped with a warning.

        Returns:
            The file's extra data (e.g. ``{"iteration": 999}``): everything except the model and the
            registered checkpointables' entries, whether restored or not.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            UnsafeCheckpointError: the file would run code when loaded; it was refused.
            CheckpointError: the file is not a valid checkpoint, or a checkpointable rejected its state.
        """
        if not path:
            logger.info("No checkpoint file given: the model keeps its initial weights.")
            return {}
        names = self._checked_names(checkpointables)
        logger.info("Loading checkpoint from %s", path)
        if os.path.isdir(path):  # a sharded (FSDP) checkpoint folder: its full weights, for this plain model
            from .sharded import load_sharded_as_file_data

            data = load_sharded_as_file_data(path)
        else:
            data = _with_model_entry(load_checkpoint_file(path), path)
        load_model_state_dict(self.model, data.pop("model"), source=path)
        loaded = ["model", *self._restore_checkpointables(names, data, path)]
        logger.info("Restored %s from %s (extra data: %s)", ", ".join(loaded), path, sorted(data) or "none")
        return data

    def _restore_checkpointables(self, names: Sequence[str], data: Dict[str, Any], path: str) -> List[str]:
        # Loads the named checkpointables' entries of `data` (from the file `path`), then drops every
        # checkpointable's entry, so that `data` is left with the extra data. Returns the names restored.
        loaded = []
        for key in names:
            if key not in data:
                logger.warning("%s has no '%s' entry: %s keeps its current state.", path, key, key)
                continue
            try:
                self.checkpointables[key].load_state_dict(data.pop(key))
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                raise CheckpointError(f"Could not restore '{key}' from '{path}': {e}") from e
            loaded.append(key)
        for key in self.checkpointables:
            data.pop(key, None)
        return loaded

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """Resume from the last checkpoint in ``save_dir`` if asked and present, else load weights from ``path``.

        Resuming restores everything (model and all checkpointables). Loading ``path`` (typically
        ``cfg.MODEL.WEIGHTS``) restores only the model; its extra data is returned too, but a caller should
        take the start iteration from it only when it resumed (``resume and has_checkpoint()``).

        Args:
            path: weights to start from when not resuming; may be empty (start from scratch).
            resume: whether to look for a ``last_checkpoint`` tag in ``save_dir``.

        Returns:
            The loaded file's extra data, see :meth:`load`.

        Raises:
            FileNotFoundError: resuming, but the file the tag names is missing. Nothing is silently restarted.
        """
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            if not os.path.exists(last):  # a file, or the folder of a sharded checkpoint
                raise FileNotFoundError(
                    f"Cannot resume: {os.path.join(self.save_dir, _TAG_FILE)} names '{last}', which does not "
                    "exist. Restore that file, point the tag at another checkpoint in the folder, or delete "
                    "the tag (or pass resume=False) to start from the given weights instead."
                )
            return self.load(last)
        return self.load(path, checkpointables=[])

    def _checked_names(self, checkpointables: Optional[Sequence[str]]) -> List[str]:
        if checkpointables is None:
            return list(self.checkpointables)
        unknown = [key for key in checkpointables if key not in self.checkpointables]
        if unknown:
            raise KeyError(
                f"Unknown checkpointable name(s) {unknown}; registered: {sorted(self.checkpointables)}."
            )
        return list(checkpointables)


def _with_model_entry(data: Dict[str, Any], path: str) -> Dict[str, Any]:
    """``data`` with its model weights under ``"model"``; a plain state_dict file becomes ``{"model": data}``."""
    if "model" in data:
        if not isinstance(data["model"], dict):
            raise CheckpointError(
                f"'{path}' is not a valid checkpoint: its 'model' entry is a {type(data['model']).__qualname__}, "
                "expected a state_dict (a dict of tensors)."
            )
        return data
    if data and all(isinstance(value, torch.Tensor) for value in data.values()):
        return {"model": data}
    raise CheckpointError(
        f"'{path}' is not a valid checkpoint: it has no 'model' entry and is not a plain state_dict of tensors "
        f"(its keys: {sorted(map(str, data))[:10]}). Extract the model weights into a state_dict file first."
    )


class PeriodicCheckpointer:
    """Saves a checkpoint every ``period`` iterations and a final one, keeping at most ``max_to_keep``.

    Not a hook: call :meth:`step` after each iteration (``trainkit.engine.hooks.PeriodicCheckpointer`` does it
    for a trainer). Iterations are 0-based: ``step(i)`` saves ``{file_prefix}_{i:07d}`` when ``(i + 1) %
    period == 0`` and ``{file_prefix}_final`` when ``i >= max_iter - 1``.
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        period: int,
        max_iter: Optional[int] = None,
        max_to_keep: Optional[int] = None,
        file_prefix: str = "model",
        async_save: bool = False,
    ):
        """
        Args:
            checkpointer: does the saving.
            period: save every ``period`` iterations.
            max_iter: total iterations; the step at ``max_iter - 1`` also saves ``{file_prefix}_final``.
            max_to_keep: keep the newest N periodic files that this run wrote, counting those written before
                a resume (the names are kept in :meth:`state_dict`, which the hook form saves in every
                checkpoint). Deletes no other file: not one the run did not write (a user's
                ``model_0000001.pth``, an earlier run's), not the ``_final`` file, not the file the
                ``last_checkpoint`` tag names. None keeps everything.
            file_prefix: file name prefix.
            async_save: save in the background (``checkpointer.save(..., blocking=False)``); old files are
                pruned by the writer once the new one is in place. Call ``checkpointer.wait()`` at the end.
        """
        if int(period) < 1:
            raise ValueError(f"period must be a positive number of iterations, got {period}.")
        if max_to_keep is not None and int(max_to_keep) < 1:
            raise ValueError(f"max_to_keep must be None (keep all) or at least 1, got {max_to_keep}.")
        self.checkpointer = checkpointer
        self.period = int(period)
        self.max_iter = max_iter
        self.max_to_keep = max_to_keep
        self.file_prefix = file_prefix
        self.async_save = bool(async_save)
        self._written: List[str] = []  # the periodic files this run saved, oldest first (names in save_dir)

    def step(self, iteration: int, **kwargs: Any) -> None:
        """Save if ``iteration`` is due; ``kwargs`` and ``iteration`` are stored as extra data."""
        iteration = int(iteration)
        extra = {"iteration": iteration, **kwargs}
        blocking = not self.async_save
        if (iteration + 1) % self.period == 0:
            name = f"{self.file_prefix}_{iteration:07d}"
            written = self.checkpointer.checkpoint_basename(name)
            # A background save in flight may still be pruning self._written: let it finish first.
            self.checkpointer.wait()
            if written not in self._written:
                self._written.append(written)  # before the save, so that the file records itself
            prune = self._delete_old_checkpoints if self.max_to_keep is not None else None
            self.checkpointer.save(name, blocking=blocking, on_written=prune, **extra)
        if self.max_iter is not None and iteration >= self.max_iter - 1:
            self.checkpointer.save(f"{self.file_prefix}_final", blocking=blocking, **extra)

    def save(self, name: str, **kwargs: Any) -> Optional[str]:
        """Same as ``checkpointer.save(name, **kwargs)``."""
        return self.checkpointer.save(name, **kwargs)

    def state_dict(self) -> Dict[str, Any]:
        """The names of the periodic files this run wrote and has not deleted (plain data)."""
        return {"written": list(self._written)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned: a resumed run goes on counting its own files."""
        self._written = [str(name) for name in state_dict.get("written", [])]

    def _delete_old_checkpoints(self) -> None:
        if not self.checkpointer.save_to_disk:
            return
        tagged = self.checkpointer.get_checkpoint_file()
        old, self._written = self._written[: -self.max_to_keep], self._written[-self.max_to_keep :]
        for name in old:
            path = os.path.join(self.checkpointer.save_dir, name)
            if tagged and os.path.abspath(path) == os.path.abspath(tagged):
                self._written.insert(0, name)  # still the resume point: deleted once it is not
                continue
            try:
                self.checkpointer.delete_checkpoint(path)
            except FileNotFoundError:
                continue
            logger.info("Deleted old checkpoint %s (max_to_keep=%d)", path, self.max_to_keep)

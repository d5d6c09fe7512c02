"""Sharded checkpoints for FSDP models, on ``torch.distributed.checkpoint`` (DCP).

A sharded checkpoint is a folder, ``{save_dir}/{name}``::

    model_0000009/
        .metadata          DCP's index of the shards (written by rank 0)
        __0_0.distcp       rank 0's shards of the model and optimizer tensors
        __1_0.distcp       rank 1's shards, ...
        extra.pth          everything else (trainer state, optimizer hyper-parameters, iteration): a plain
                           torch.save file written by rank 0, loaded with weights_only=True

Saving is published atomically: every rank writes into ``{save_dir}/.{name}.trainkit-tmp``; when DCP has
gathered every rank's result and written the metadata, rank 0 writes ``extra.pth``, renames the folder to
``{name}`` and only then points the ``last_checkpoint`` tag at it. A process killed at any moment leaves
the previous checkpoint and its tag as they were; the next save deletes the unfinished folder.

Loading reshards: a checkpoint saved by N processes loads into M processes, and into a plain model in one
process (:func:`load_sharded_into_plain`, :func:`convert_to_file`, or
``python -m trainkit.checkpoint.sharded SRC_FOLDER DST.pth``).

Loading never runs code from the files. DCP's own reader unpickles ``.metadata`` without restriction, and
its planner loads non-tensor entries with ``torch.load(weights_only=False)``; both would run code planted in
a checkpoint. Here ``.metadata`` is read by an unpickler that admits only DCP's metadata classes and plain
containers (:func:`read_metadata`), the shards hold tensors only (a non-tensor entry is refused), and the
non-tensor state lives in ``extra.pth``, loaded with ``weights_only=True``.
"""
import argparse
import copy
import logging
import os
import pickle
import shutil
import threading
import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .checkpointer import Checkpointer
from .model_loading import load_model_state_dict
from .serialization import (
    TEMP_SUFFIX,
    CheckpointError,
    UnsafeCheckpointError,
    _fsync_dir,
    atomic_save,
    check_weights_only_loadable,
    load_checkpoint_file,
)

__all__ = [
    "ShardedCheckpointer",
    "read_metadata",
    "is_sharded_checkpoint",
    "load_sharded_model_state_dict",
    "load_sharded_as_file_data",
    "load_sharded_into_plain",
    "convert_to_file",
]

logger = logging.getLogger(__name__)

EXTRA_FILE = "extra.pth"
_METADATA_FILE = ".metadata"
_TAG_FILE = "last_checkpoint"

# What a DCP .metadata pickle may name: DCP's own metadata classes, torch.Size, the layout helper that torch
# pickles layouts with, paths (StorageMeta.checkpoint_id) and, below, torch dtypes. Anything else is refused.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"Refusing to read '{self._path}': its pickle names {module}.{name}, which is not one of the "
            "classes of a torch.distributed.checkpoint metadata file, and trainkit never runs code from a "
            "checkpoint. Nothing in it was run. Use another checkpoint, or one written by trainkit or DCP."
        )


def read_metadata(path: str) -> Metadata:
    """Reads a DCP ``.metadata`` file (or the folder holding one) with a restricted unpickler.

    Raises:
        FileNotFoundError: no metadata file (the save did not finish).
        UnsafeCheckpointError: the pickle names something other than DCP's metadata classes; nothing ran.
        CheckpointError: the file is truncated or is not DCP metadata.
    """
    if os.path.isdir(path):
        path = os.path.join(path, _METADATA_FILE)
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"'{path}' is not a valid DCP metadata file ({type(e).__name__}: {e}).") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"'{path}' holds a {type(metadata).__qualname__}, not DCP Metadata.")
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader, with the metadata read by :func:`read_metadata` instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = _METADATA_FILE if rank is None else f"__{rank}{_METADATA_FILE}"
        metadata = read_metadata(os.path.join(os.fspath(self.path), name))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner, refusing non-tensor entries (DCP would ``torch.load`` them with
    ``weights_only=False``). trainkit's shards hold tensors only."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise UnsafeCheckpointError(
            f"The sharded checkpoint holds a pickled non-tensor entry {read_item.dest_index.fqn!r}; trainkit loads "
            "only tensors from shards (non-tensor state belongs in extra.pth, loaded with weights_only=True)."
        )


def is_sharded_checkpoint(path: str) -> bool:
    """Whether ``path`` is a complete sharded checkpoint folder (DCP metadata and ``extra.pth``)."""
    return os.path.isfile(os.path.join(path, _METADATA_FILE)) and os.path.isfile(os.path.join(path, EXTRA_FILE))


def _split_optimizer_state(osd: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    # (tensors for the shards, everything else for extra.pth): param_groups and any non-tensor state value.
    tensors: Dict[str, Dict[str, Any]] = {}
    other: Dict[str, Any] = {"param_groups": osd["param_groups"], "state": {}}
    for fqn, state in osd["state"].items():
        tensors[fqn] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        plain = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        if plain:
            other["state"][fqn] = plain
    return tensors, other


def _merge_optimizer_state(tensors: Dict[str, Any], other: Dict[str, Any]) -> Dict[str, Any]:
    state = {fqn: {**values, **other["state"].get(fqn, {})} for fqn, values in tensors.items()}
    return {"state": state, "param_groups": other["param_groups"]}


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def _one_process_is_meant() -> Iterator[None]:
    # Without a process group DCP warns on every call that it assumes one process; here that is the intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if _is_distributed():
        dist.barrier()


class ShardedCheckpointer(Checkpointer):
    """A :class:`Checkpointer` that saves an FSDP model and its optimizer as a sharded DCP checkpoint folder.

    Same API as :class:`Checkpointer` (``save``, ``load``, ``resume_or_load``, the ``last_checkpoint`` tag),
    but every process takes part in every save and load: each writes and reads its own shards. The model and
    optimizer state come from ``get_model_state_dict`` / ``get_optimizer_state_dict`` (keyed by parameter
    name, so they reshard to any number of processes); the other checkpointables' states go to
    ``extra.pth``, written by rank 0 alone (as the main process writes a :class:`Checkpointer` file).

    Also works without a process group (one process, a plain model): the folder has one shard file.

    Args:
        model: the model (sharded with ``fully_shard``, or plain).
        save_dir: the folder of the checkpoints and the tag. Empty: never save.
        optimizer: the optimizer over the model's (sharded) parameters; saved with the model, by parameter
            name. Do not also pass it in ``checkpointables``.
        async_save: the default of :meth:`save`'s ``blocking`` is ``not async_save``
            (``SOLVER.CHECKPOINT_ASYNC``).
        **checkpointables: other objects with ``state_dict``/``load_state_dict`` (the trainer, ...).
    """

    def __init__(
        self, model: nn.Module, save_dir: str = "", *, optimizer: Optional[torch.optim.Optimizer] = None,
        async_save: bool = False, **checkpointables: Any,
    ) -> None:
        rank = dist.get_rank() if _is_distributed() else 0
        super().__init__(model, save_dir, save_to_disk=rank == 0, **checkpointables)
        self.optimizer = optimizer
        self.async_save = async_save
        # A background save: DCP's future, and (rank 0) an event set once the folder is published.
        self._pending: Optional[Tuple[Future, Optional[threading.Event]]] = None
        self._pending_error: Optional[BaseException] = None
        self._async_group: Any = None

    # ---------------------------------------------------------------------------------------- saving
    def save(
        self, name: str, *, tag: bool = True, blocking: Optional[bool] = None,
        on_written: Optional[Callable[[], None]] = None, **extra: Any,
    ) -> Optional[str]:
        """Writes the sharded checkpoint ``{save_dir}/{name}`` (a collective: every process calls it).

        Args:
            name: folder name, e.g. ``"model_0000999"``.
            tag: point ``last_checkpoint`` at it once it is complete.
            blocking: False returns once the state is copied to memory (DCP's ``async_save``); the files are
                written in the background, and rank 0 publishes the folder and the tag when every rank is
                done. The next save, load or :meth:`wait` waits for it. None: ``not async_save``.
            on_written: called on rank 0 once the folder and its tag are in place (in the background for a
                non-blocking save), as in :meth:`Checkpointer.save`; the periodic checkpointer prunes there.
            **extra: more plain data to store (``iteration=999``), in ``extra.pth``.

        Returns:
            the folder path on rank 0 (where it will be, for a non-blocking save); None on other ranks.
        """
        if not self.save_dir:
            return None
        if not name or os.path.basename(name) != name:
            raise ValueError(f"Checkpoint name must be a plain folder name without parents, got '{name}'.")
        self.wait()
        blocking = not self.async_save if blocking is None else blocking
        tensors, rest = self._collect(extra, name)
        final = os.path.join(self.save_dir, name)
        tmp = os.path.join(self.save_dir, f".{name}{TEMP_SUFFIX}")
        if self.save_to_disk:
            os.makedirs(self.save_dir, exist_ok=True)
            _remove_unfinished_saves(self.save_dir, keep=self._tagged_name())
        _barrier()  # the unfinished folders are gone before anyone writes into the new one
        writer = FileSystemWriter(tmp)
        logger.info("Saving sharded checkpoint to %s%s", final, "" if blocking else " (in the background)")
        if blocking:
            with _one_process_is_meant():
                dcp.save(tensors, storage_writer=writer, no_dist=not _is_distributed())
            self._publish(rest, tmp, final, tag)
            if self.save_to_disk and on_written is not None:
                on_written()
            _barrier()  # every process returns with the checkpoint published
        else:
            if _is_distributed() and self._async_group is None:
                # A group of its own, so that the background save's collectives never interleave with the
                # training's on the default group.
                self._async_group = dist.new_group(backend="gloo")
            with _one_process_is_meant():
                future = dcp.async_save(
                    tensors, storage_writer=writer, process_group=self._async_group, no_dist=not _is_distributed()
                )
            published = threading.Event() if self.save_to_disk else None
            if published is not None:
                rest = copy.deepcopy(rest)  # training goes on and changes the objects these states refer to
                future.add_done_callback(
                    lambda f: self._publish_when_done(f, rest, tmp, final, tag, published, on_written)
                )
            self._pending = (future, published)
        return final if self.save_to_disk else None

    def _collect(self, extra: Dict[str, Any], name: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        taken = sorted(set(extra) & ({"model", "optimizer"} | set(self.checkpointables)))
        if taken:
            raise ValueError(f"Extra data names {taken} clash with the model/checkpointable entries; rename them.")
        tensors: Dict[str, Any] = {"model": get_model_state_dict(self.model)}
        rest: Dict[str, Any] = {}
        if self.optimizer is not None:
            tensors["optimizer"], rest["optimizer"] = _split_optimizer_state(
                get_optimizer_state_dict(self.model, self.optimizer)
            )
        for key, obj in self.checkpointables.items():
            rest[key] = obj.state_dict()  # on every rank: a state_dict() may be a collective
        rest.update(extra)
        if self.save_to_disk:
            check_weights_only_loadable(rest, name=f"{name}/{EXTRA_FILE}")
        return tensors, rest

    def _publish(self, rest: Dict[str, Any], tmp: str, final: str, tag: bool) -> None:
        # DCP has written every rank's shards and the metadata; make the folder complete, then visible.
        if not self.save_to_disk:
            return
        atomic_save(rest, os.path.join(tmp, EXTRA_FILE))
        _fsync_dir(tmp)
        name = os.path.basename(final)
        old = os.path.join(self.save_dir, f".{name}.old{TEMP_SUFFIX}")
        # The tag moves to the new folder when asked, or when it named the old one (moved aside just now, or
        # by a save of this name that was killed while replacing it).
        retag = tag or self._tagged_name() == os.path.basename(old)
        if os.path.exists(final):  # saving a name again (a preemption at a periodic iteration, model_best)
            retag = self._move_aside(final, old) or retag
        os.replace(tmp, final)
        _fsync_dir(self.save_dir)
        if retag:
            self.tag_last_checkpoint(name)
        if os.path.exists(old):
            shutil.rmtree(old)

    def _move_aside(self, final: str, old: str) -> bool:
        # Replaces a folder that the tag may name, so that the tag names a complete folder at every moment: a
        # hard-linked copy of it first (no data is copied), the tag to the copy, then the folder goes. Returns
        # whether the tag named it.
        shutil.rmtree(old, ignore_errors=True)
        shutil.copytree(final, old, copy_function=os.link)
        _fsync_dir(self.save_dir)
        tagged = self._tagged_name() == os.path.basename(final)
        if tagged:
            self.tag_last_checkpoint(os.path.basename(old))
        shutil.rmtree(final)
        return tagged

    def _tagged_name(self) -> str:
        try:
            return os.path.basename(self.get_checkpoint_file())
        except CheckpointError:
            return ""

    def _publish_when_done(
        self, future: Future, rest: Dict[str, Any], tmp: str, final: str, tag: bool, published: threading.Event,
        on_written: Optional[Callable[[], None]],
    ) -> None:
        # Runs in DCP's background thread on rank 0 once every rank's shards and the metadata are written.
        try:
            future.result()
            self._publish(rest, tmp, final, tag)
            if on_written is not None:
                on_written()
            logger.info("Background save of %s finished.", final)
        except BaseException as e:  # raised in the training thread by the next wait()
            self._pending_error = e
        finally:
            published.set()

    def wait(self) -> None:
        """Waits for a background save to be written and published; raises what it raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            future, published = pending
            try:
                future.result()
            except BaseException as e:
                self._pending_error = self._pending_error or e
            if published is not None:
                published.wait()
            _barrier()  # rank 0's publishing (its done-callback) has finished on every rank's return
        error, self._pending_error = self._pending_error, None
        if error is not None:
            raise CheckpointError(f"The background checkpoint save failed: {error}") from error

    # --------------------------------------------------------------------------------------- finding
    def checkpoint_basename(self, name: str) -> str:
        """The folder :meth:`save` writes for ``name``: ``{name}``."""
        return name

    def delete_checkpoint(self, path: str) -> None:
        """Deletes a checkpoint folder (rank 0; for ``max_to_keep``)."""
        if not os.path.isdir(path):
            raise FileNotFoundError(path)
        shutil.rmtree(path)

    def get_all_checkpoint_files(self) -> List[str]:
        """The complete checkpoint folders in ``save_dir``, sorted by name (unfinished saves excluded)."""
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return []
        paths = (os.path.join(self.save_dir, n) for n in os.listdir(self.save_dir) if not n.startswith("."))
        return sorted(p for p in paths if is_sharded_checkpoint(p))

    # --------------------------------------------------------------------------------------- loading
    def load(self, path: str, checkpointables: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """Restores the model (and the optimizer and checkpointables) from a sharded folder, or the model
        alone from a ``.pth`` file (e.g. ``MODEL.WEIGHTS`` from a DDP run). Every process calls it.

        Returns:
            the extra data (``{"iteration": 999}``), as :meth:`Checkpointer.load`.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            UnsafeCheckpointError: a file would run code; refused.
            CheckpointError: not a complete checkpoint, or a part did not fit.
        """
        if not path:
            logger.info("No checkpoint file given: the model keeps its initial weights.")
            return {}
        self.wait()
        names = self._checked_names(checkpointables)
        if os.path.isfile(path):
            data = load_checkpoint_file(path)
            weights = data.pop("model", data)
            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
            logger.info("Loaded the model weights of %s into the sharded model.", path)
            return {k: v for k, v in data.items() if k not in self.checkpointables and k != "optimizer"}
        if not is_sharded_checkpoint(path):
            raise FileNotFoundError(
                f"'{path}' is neither a checkpoint file nor a complete sharded checkpoint folder (one with "
                f"{_METADATA_FILE} and {EXTRA_FILE}). Check the path."
            )
        logger.info("Loading sharded checkpoint from %s", path)
        rest = load_checkpoint_file(os.path.join(path, EXTRA_FILE))
        with_optimizer = self.optimizer is not None and checkpointables != [] and "optimizer" in rest
        tensors: Dict[str, Any] = {"model": get_model_state_dict(self.model)}
        if with_optimizer:
            tensors["optimizer"], _ = _split_optimizer_state(get_optimizer_state_dict(self.model, self.optimizer))
        _dcp_load(tensors, path)
        set_model_state_dict(self.model, tensors["model"])
        if with_optimizer:
            optimizer_state = _merge_optimizer_state(tensors["optimizer"], rest["optimizer"])
            set_optimizer_state_dict(self.model, self.optimizer, optimizer_state)
        rest.pop("optimizer", None)
        self._restore_checkpointables(names, rest, path)
        return rest

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """As :meth:`Checkpointer.resume_or_load`, for checkpoint folders."""
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            if os.path.isfile(last):
                raise CheckpointError(
                    f"Cannot resume a sharded (MODEL.PARALLEL fsdp) run from {last}: it is a single-file checkpoint "
                    "of an unsharded run. Start a new run from its weights (MODEL.WEIGHTS with a new OUTPUT_DIR, "
                    "without --resume), or resume it with MODEL.PARALLEL ddp."
                )
            if not is_sharded_checkpoint(last):
                raise FileNotFoundError(
                    f"Cannot resume: {os.path.join(self.save_dir, _TAG_FILE)} names '{last}', which is not a "
                    "complete sharded checkpoint folder. Point the tag at another checkpoint in the folder, or "
                    "delete the tag (or pass resume=False) to start from the given weights instead."
                )
            return self.load(last)
        return self.load(path, checkpointables=[])


def _remove_unfinished_saves(save_dir: str, keep: str) -> None:
    # Every hidden temporary folder but ``keep``: the tag names a moved-aside folder after a kill mid-replace.
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if name.startswith(".") and name.endswith(TEMP_SUFFIX) and os.path.isdir(path) and name != keep:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("Removed %s, left by a save that did not finish.", path)


def _dcp_load(state_dict: Dict[str, Any], path: str) -> None:
    read_metadata(path)  # refuses a planted pickle with its own error, before DCP wraps errors in its own
    try:
        with _one_process_is_meant():
            dcp.load(state_dict, storage_reader=_SafeReader(path), planner=_TensorsOnlyPlanner(),
                     no_dist=not _is_distributed())
    except UnsafeCheckpointError:
        raise
    except (RuntimeError, CheckpointException) as e:
        raise CheckpointError(f"Could not load the sharded checkpoint '{path}' into this model: {e}") from e


def load_sharded_model_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The full (unsharded) model weights of a sharded checkpoint folder, as a plain state_dict on the CPU.

    Needs no process group and no model: one process reads every shard.
    """
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"'{path}' is not a complete sharded checkpoint folder.")
    metadata = read_metadata(path)
    template = {
        fqn: torch.empty(md.size, dtype=md.properties.dtype)
        for fqn, md in metadata.state_dict_metadata.items()
        if fqn.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    with _one_process_is_meant():
        dcp.load(template, storage_reader=_SafeReader(path), planner=_TensorsOnlyPlanner(), no_dist=True)
    return {fqn[len("model."):]: tensor for fqn, tensor in template.items()}


def load_sharded_as_file_data(path: str) -> Dict[str, Any]:
    """A sharded checkpoint folder as the dict a single-file checkpoint would hold: ``{"model": full weights,
    **plain extra data (e.g. "iteration")}``; the trainer and optimizer states are left out."""
    data: Dict[str, Any] = {"model": load_sharded_model_state_dict(path)}
    rest = load_checkpoint_file(os.path.join(path, EXTRA_FILE))
    data.update({k: v for k, v in rest.items() if k != "model" and not isinstance(v, dict)})
    return data


def load_sharded_into_plain(model: nn.Module, path: str) -> Dict[str, Any]:
    """Loads the weights of a sharded checkpoint folder into a plain (unsharded) model in one process, for
    ``--eval-only`` or export without the cluster. (``Checkpointer.load`` of a folder does the same.)

    Returns:
        the checkpoint's plain extra data (``{"iteration": ...}``).
    """
    data = load_sharded_as_file_data(path)
    load_model_state_dict(model, data.pop("model"), source=path)
    return data


def convert_to_file(path: str, output: str) -> str:
    """Writes the full model weights and the plain extra data (e.g. the iteration) of a sharded checkpoint
    folder to one ``.pth`` file, which :class:`Checkpointer`, ``MODEL.WEIGHTS`` and
    ``torch.load(weights_only=True)`` read.

    Returns:
        ``output``.
    """
    atomic_save(load_sharded_as_file_data(path), output)
    logger.info("Wrote the model weights of %s to %s", path, output)
    return output


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m trainkit.checkpoint.sharded SRC_FOLDER DST.pth``: a sharded checkpoint to one file."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("src", help="a sharded checkpoint folder, e.g. output/model_final")
    parser.add_argument("dst", help="the .pth file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    convert_to_file(args.src, args.dst)


if __name__ == "__main__":
    main()

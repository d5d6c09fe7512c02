"""Crash-safe writes and code-free reads of checkpoint files.

Writes go to a temporary file in the destination folder, are flushed and fsynced, renamed over the destination
with ``os.replace`` and followed by an fsync of the folder. A process killed at any moment therefore leaves
either the old file or the complete new one, never a partial file under the final name. Temporary files carry
the suffix :data:`TEMP_SUFFIX` and a leading dot, so nothing that lists ``*.pth`` files mistakes them for
checkpoints; :func:`remove_stale_temp_files` deletes the ones a killed writer left behind.

Reads use ``torch.load(..., weights_only=True)``: a file whose pickle would import and call Python code is
refused, never executed. There is no fallback to ``weights_only=False``.
"""
import collections
import errno
import logging
import os
import pickle
import re
import secrets
import warnings
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "TEMP_SUFFIX",
    "atomic_save",
    "atomic_write_text",
    "load_checkpoint_file",
    "check_weights_only_loadable",
    "remove_stale_temp_files",
]

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".trainkit-tmp"
"""Suffix of the temporary files written by :func:`atomic_save` and :func:`atomic_write_text`."""


class CheckpointError(RuntimeError):
    """A file exists but is not a valid checkpoint (truncated, corrupt, or not a ``torch.save`` dict)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle would run Python code when loaded; it was refused and nothing in it was run."""


# Types that torch.load(weights_only=True) rebuilds without an allowlist entry. Exact types only: a subclass
# (a namedtuple, a numpy float64, an IntEnum) is pickled by reference to its own class and is refused.
_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, bytearray)
_PLAIN_TYPES += (torch.Size, torch.device, torch.dtype)
_MAPPING_TYPES = (dict, collections.OrderedDict, collections.Counter)
_SEQUENCE_TYPES = (list, tuple, set)
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _fsync_dir(dirname: str) -> None:
    """Make a rename inside ``dirname`` durable (POSIX only; Windows cannot open folders)."""
    if os.name == "nt":
        return
    fd = os.open(dirname, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems (several network ones) cannot fsync a folder; the rename has happened regardless.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
        logger.debug("Cannot fsync folder %s (%s); the rename may not survive a power loss.", dirname, e)
    finally:
        os.close(fd)


def _create_temp_file(path: str) -> Tuple[int, str]:
    """Create a new hidden file next to ``path``; unlike ``tempfile.mkstemp`` (mode 0600) it honours the umask."""
    dirname, basename = os.path.split(os.path.abspath(path))
    while True:
        tmp_path = os.path.join(dirname, f".{basename}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            return os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp_path
        except FileExistsError:
            continue


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then durably rename it to ``path``."""
    fd, tmp_path = _create_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        disk_full = _disk_full_error(e, path)  # measured before our temporary file frees its space
        # Also on KeyboardInterrupt: never leave our own half-written file behind when we can help it.
        try:
            os.remove(tmp_path)
        except FileNotFoundError:
            pass
        if disk_full is not None:
            raise disk_full from e
        raise
    _fsync_dir(os.path.dirname(tmp_path))


def _disk_full_error(error: BaseException, path: str) -> Optional[OSError]:
    # torch.save reports a full disk as "unexpected pos ..." (a RuntimeError of its zip writer); say what it is.
    if not isinstance(error, Exception):
        return None
    folder = os.path.dirname(os.path.abspath(path))
    try:
        stat = os.statvfs(folder)
        free = stat.f_bavail * stat.f_frsize
    except OSError:
        return None
    if getattr(error, "errno", None) != errno.ENOSPC and free >= 2**20:
        return None
    return OSError(
        errno.ENOSPC,
        f"No space left on the disk while writing {path} (folder {folder}, {free} bytes free). The file was not "
        "written; the previous checkpoint and the last_checkpoint tag are untouched. Free some space (or move "
        "OUTPUT_DIR to a disk with room) and run again with --resume.",
    )


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` so that ``path`` never holds a partial file.

    Args:
        obj: what to save. Call :func:`check_weights_only_loadable` first if it must load with
            ``weights_only=True``.
        path: destination file; its folder must exist.
    """
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that ``path`` never holds a partial file."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_stale_temp_files(dirname: str) -> List[str]:
    """Delete the temporary files that a killed :func:`atomic_save` left in ``dirname``.

    Assumes one writing process per folder (the main process, in distributed runs): a temporary file of a
    save that is still running in another process would be deleted too.

    Returns:
        The paths deleted.
    """
    removed = []
    if not os.path.isdir(dirname):
        return removed
    for name in sorted(os.listdir(dirname)):
        if name.startswith(".") and name.endswith(TEMP_SUFFIX):
            path = os.path.join(dirname, name)
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    if removed:
        logger.info("Removed %d temporary file(s) left by an interrupted save: %s", len(removed), removed)
    return removed


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_weights_only_loadable(obj: Any, name: str = "checkpoint") -> None:
    """Raise if ``obj`` holds something that ``torch.load(weights_only=True)`` would refuse to load.

    Checking before writing turns a resume that would fail days later into an error at the first save.
    Tensors, plain Python scalars and strings, dicts/lists/tuples/sets of them, ``torch.Size``, ``torch.dtype``
    and ``torch.device`` are accepted, as are types registered with ``torch.serialization.add_safe_globals``.

    Args:
        obj: the object about to be saved.
        name: how to refer to ``obj`` in the error message.

    Raises:
        TypeError: naming the offending entry (e.g. ``checkpoint['trainer']['rng']``) and its type.
    """
    user_safe = set(torch.serialization.get_safe_globals())
    seen: Set[int] = set()
    stack = [(obj, name)]
    while stack:
        value, where = stack.pop()
        cls = type(value)
        if cls in _PLAIN_TYPES or cls in _TENSOR_TYPES or cls in user_safe:
            continue
        if cls in _MAPPING_TYPES or cls in _SEQUENCE_TYPES:
            if id(value) in seen:
                continue
            seen.add(id(value))
            if cls in _MAPPING_TYPES:
                for key, item in value.items():
                    stack.append((key, f"{where} (key {key!r})"))
                    stack.append((item, f"{where}[{key!r}]"))
            else:
                stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))
            continue
        raise TypeError(
            f"{where} is a {_qualname(value)}, which torch.load(weights_only=True) refuses to load, so this "
            "checkpoint could never be resumed. Store tensors and plain Python data instead (e.g. "
            "torch.from_numpy(array), float(numpy_scalar), a dict instead of an object), or allowlist the type "
            "with torch.serialization.add_safe_globals([...])."
        )


_UNSAFE_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _unsafe_globals(path: str, error: Exception) -> List[str]:
    """The globals that made weights_only refuse ``path``, found without running its pickle."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint (legacy format) or unreadable: fall back to the error text
        found = []
    return found or _UNSAFE_GLOBAL_RE.findall(str(error))


def _short_reason(error: Exception) -> str:
    """The informative first sentence of a torch.load error (its messages run to many lines)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "no message")
    return f"{type(error).__name__}: {first.split('. ')[0].rstrip('.')}"


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Load a checkpoint file with ``torch.load(path, map_location="cpu", weights_only=True)``.

    Args:
        path: a file written by ``torch.save`` holding a dict.

    Returns:
        The dict stored in the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: loading would run code from the file; nothing was run.
        CheckpointError: the file is truncated, corrupt, or does not hold a dict.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file not found: '{path}'. Check the path (and MODEL.WEIGHTS).")
    try:
        with warnings.catch_warnings():
            # A non-torch pickle makes torch warn about its protocol before failing; our error says more.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise
    except Exception as e:
        unsafe = _unsafe_globals(path, e) if isinstance(e, pickle.UnpicklingError) else []
        if unsafe:
            raise UnsafeCheckpointError(
                f"Refusing to load '{path}': its pickle would import and run Python code ({', '.join(unsafe)}), "
                "and trainkit never runs code from a checkpoint. If you trust the file, convert it once with "
                f"`python -m trainkit.checkpoint.convert {path} NEW.pth` (this runs its code one time) and load "
                "NEW.pth instead."
            ) from e
        hint = (
            "A plain pickle you trust can be converted with `python -m trainkit.checkpoint.convert`."
            if path.endswith(".pkl")
            else "The file may be truncated or corrupt (an interrupted copy?); use an earlier checkpoint."
        )
        reason = _short_reason(e)
        raise CheckpointError(
            f"'{path}' is not a valid checkpoint: torch.load(weights_only=True) failed ({reason}). {hint}"
        ) from e
    if not isinstance(data, dict):
        raise CheckpointError(
            f"'{path}' is not a valid checkpoint: it holds a {_qualname(data)}, expected a dict such as "
            "{'model': state_dict, ...} or a plain model state_dict."
        )
    return data

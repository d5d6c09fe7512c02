"""One run at a time owns an OUTPUT_DIR: an exclusive lock that the kernel releases when the process dies.

Two runs writing into one folder delete each other's temporary files and overwrite each other's checkpoints.
:func:`lock_output_dir` takes an exclusive POSIX lock (``fcntl.lockf``) on ``{output_dir}/.trainkit.lock``.
The kernel releases it when the process ends in any way, SIGKILL included, so a killed run never leaves a
stale lock behind. (A PID file alone would: it outlives its process.) Not ``fcntl.flock``: a flock belongs to
the open file, which forked DataLoader workers inherit, so it would stay held by persistent workers after
the run released it; a POSIX lock belongs to the process and is not inherited.
"""
import errno
import fcntl
import logging
import os
from typing import Dict

__all__ = ["OutputDirInUseError", "lock_output_dir", "unlock_output_dir"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".trainkit.lock"

# The locks this process holds, by real path: taking one again in the same process is a no-op (a second
# trainer in one script, or default_setup and then DefaultTrainer). Kept open until the process ends.
_HELD: Dict[str, int] = {}


class OutputDirInUseError(RuntimeError):
    """Another process holds the lock of the OUTPUT_DIR."""


def lock_output_dir(output_dir: str) -> bool:
    """Takes the exclusive lock of ``output_dir`` (creating the folder) until :func:`unlock_output_dir` or the
    end of this process.

    Call it on the main process only: the other processes of a run write no files there.

    Returns:
        True when this call took the lock, False when this process already held it.

    Raises:
        OutputDirInUseError: another live process holds it; the message names the folder and its PID.
    """
    os.makedirs(output_dir, exist_ok=True)
    key = os.path.realpath(output_dir)
    if key in _HELD:
        return False
    path = os.path.join(output_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise OutputDirInUseError(
            f"OUTPUT_DIR {output_dir!r} is in use by another run (PID {_read_pid(path)}, which holds {path}). Two "
            "runs in one folder overwrite each other's checkpoints. Wait for that run to end (or stop it), or give "
            "this run another OUTPUT_DIR."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = fd
    logger.debug("Locked %s for this run (PID %d)", output_dir, os.getpid())
    return True


def unlock_output_dir(output_dir: str) -> None:
    """Releases the lock that :func:`lock_output_dir` took in this process (nothing if it holds none)."""
    fd = _HELD.pop(os.path.realpath(output_dir), None)
    if fd is not None:
        os.close(fd)  # closing the file releases the lock


def _read_pid(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"

"""Logging setup: console on the main process, a log file per process."""
import functools
import logging
import os
import sys
from typing import Optional

__all__ = ["setup_logger"]


@functools.lru_cache()  # the same logger is set up once, however often this is called
def setup_logger(
    output: Optional[str] = None, distributed_rank: int = 0, *, name: str = "trainkit", level: int = logging.INFO
) -> logging.Logger:
    """Sets up the ``name`` logger: INFO to the console (main process only) and to a file.

    Args:
        output: a folder (the log goes to ``output/log.txt``) or a file path ending in .txt/.log. Processes
            other than rank 0 write to ``<file>.rank<r>``.
        distributed_rank: this process's rank.
        name: the logger to set up; ``"trainkit"`` covers every module of the library.
        level: the logger's level.

    Returns:
        the logger.
    """
    logger = logging.getLogger(name)
    logger.setLevel(level)
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s %(name)s %(levelname)s]: %(message)s", datefmt="%m/%d %H:%M:%S")
    if distributed_rank == 0:
        console = logging.StreamHandler(stream=sys.stdout)
        console.setFormatter(fmt)
        logger.addHandler(console)
    if output is not None:
        filename = output if output.endswith((".txt", ".log")) else os.path.join(output, "log.txt")
        if distributed_rank > 0:
            filename = f"{filename}.rank{distributed_rank}"
        os.makedirs(os.path.dirname(filename) or ".", exist_ok=True)
        handler = logging.FileHandler(filename, mode="a")
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger

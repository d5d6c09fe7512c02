"""Runs tools/train_net.py and SIGKILLs the process at one scripted moment of saving one checkpoint file.

    python tests/tools/kill_at.py MOMENT FILE train_net.py-arguments...

MOMENT: ``before_save`` (the save of FILE starts), ``inside_snapshot`` (an async save of FILE has copied the
state to host memory, nothing written yet), ``inside_save`` (FILE's bytes are in the temporary file,
not yet renamed), ``after_save`` (FILE is in place, the tag not yet moved to it) or ``after_tag`` (the tag
names FILE). With ``SOLVER.CHECKPOINT_ASYNC True`` the last three happen in the background writer's thread. The test of reliability round two uses it to kill real runs where it hurts most.
"""
import os
import runpy
import signal
import sys
from pathlib import Path

import torch

from trainkit.checkpoint import checkpointer as checkpointer_module
from trainkit.checkpoint import serialization

MOMENT, FILE = sys.argv[1], sys.argv[2]


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


_save, _tag, _atomic_save = (checkpointer_module.Checkpointer.save, checkpointer_module.Checkpointer.tag_last_checkpoint,
                             checkpointer_module.atomic_save)
_snapshot = checkpointer_module.snapshot_to_host
_saving = [""]


def save(self, name, **kwargs):
    if MOMENT == "before_save" and f"{name}.pth" == FILE:
        _kill()
    _saving[0] = f"{name}.pth"
    return _save(self, name, **kwargs)


def snapshot_to_host(obj, reuse=None):
    copied = _snapshot(obj, reuse)
    if MOMENT == "inside_snapshot" and _saving[0] == FILE:
        _kill()
    return copied


def atomic_save(obj, path):
    if MOMENT == "inside_save" and os.path.basename(path) == FILE:
        serialization._atomic_write(path, lambda f: (torch.save(obj, f), f.flush(), _kill()))
    _atomic_save(obj, path)


def tag_last_checkpoint(self, basename):
    if MOMENT == "after_save" and basename == FILE:
        _kill()
    _tag(self, basename)
    if MOMENT == "after_tag" and basename == FILE:
        _kill()


checkpointer_module.Checkpointer.save = save
checkpointer_module.Checkpointer.tag_last_checkpoint = tag_last_checkpoint
checkpointer_module.atomic_save = atomic_save
checkpointer_module.snapshot_to_host = snapshot_to_host
repo = Path(__file__).resolve().parents[2]
sys.argv = [str(repo / "tools" / "train_net.py"), *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")

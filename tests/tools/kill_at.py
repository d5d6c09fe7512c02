"""Runs tools/train_net.py and SIGKILLs the process at one scripted moment of saving one checkpoint file.

    python tests/tools/kill_at.py MOMENT FILE train_net.py-arguments...
    python tests/tools/kill_at.py --each MOMENT:FILE,MOMENT:FILE,... train_net.py-arguments...

The second form runs one train_net.py per MOMENT:FILE pair, one after the other, each in a process forked
from this one (so torch is imported once, not once per kill), and prints one JSON line per run: the pair, the
signal that ended it, and the iteration of the checkpoint that the ``last_checkpoint`` tag names afterwards.

MOMENT: ``before_save`` (the save of FILE starts), ``inside_snapshot`` (an async save of FILE has copied the
state to host memory, nothing written yet), ``inside_save`` (FILE's bytes are in the temporary file,
not yet renamed), ``after_save`` (FILE is in place, the tag not yet moved to it) or ``after_tag`` (the tag
names FILE). With ``SOLVER.CHECKPOINT_ASYNC True`` the last three happen in the background writer's thread.
The test of reliability round two uses it to kill real runs where it hurts most.
"""
import json
import os
import runpy
import signal
import sys
from pathlib import Path

import torch

from trainkit.checkpoint import checkpointer as checkpointer_module
from trainkit.checkpoint import serialization

MOMENT, FILE = "", ""


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


_save, _tag = checkpointer_module.Checkpointer.save, checkpointer_module.Checkpointer.tag_last_checkpoint
_atomic_save = checkpointer_module.atomic_save
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
TRAIN_NET = str(Path(__file__).resolve().parents[2] / "tools" / "train_net.py")


def _train(args):
    sys.argv = [TRAIN_NET, *args]
    runpy.run_path(TRAIN_NET, run_name="__main__")


def _each(plan, args):
    global MOMENT, FILE
    import importlib

    # What train_net.py imports on its way (several seconds on a busy host), imported once before the forks.
    for module in ("trainkit.engine", "trainkit.data", "torch._dynamo", "sklearn.datasets", "tensorboard"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    out = args[args.index("OUTPUT_DIR") + 1]
    for pair in plan.split(","):
        pid = os.fork()
        if pid == 0:
            MOMENT, FILE = pair.split(":")
            try:
                _train(args)
            except BaseException:
                import traceback

                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        tag = os.path.join(out, "last_checkpoint")
        tagged = open(tag).read() if os.path.exists(tag) else None
        iteration = serialization.load_checkpoint_file(os.path.join(out, tagged))["iteration"] if tagged else None
        signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        print(json.dumps({"pair": pair, "signal": signum, "tagged": tagged, "iteration": iteration}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--each":
        _each(sys.argv[2], sys.argv[3:])
    else:
        MOMENT, FILE = sys.argv[1], sys.argv[2]
        _train(sys.argv[3:])

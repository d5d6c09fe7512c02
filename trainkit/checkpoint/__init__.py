"""Checkpoints: atomic writes, ``weights_only`` loads, periodic saving with a retention limit.

``trainkit.checkpoint.convert`` (not imported here, so that ``python -m`` runs it cleanly) converts a trusted
old-style checkpoint.
"""
from .checkpointer import Checkpointer, PeriodicCheckpointer
from .model_loading import load_model_state_dict
from .serialization import CheckpointError, UnsafeCheckpointError

__all__ = [
    "Checkpointer",
    "PeriodicCheckpointer",
    "CheckpointError",
    "UnsafeCheckpointError",
    "load_model_state_dict",
]

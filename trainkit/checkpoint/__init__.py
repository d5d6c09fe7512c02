"""Checkpoints: atomic writes, ``weights_only`` loads, periodic saving with a retention limit, async saves.

``trainkit.checkpoint.convert`` (not imported here, so that ``python -m`` runs it cleanly) converts a trusted
old-style checkpoint.
"""
from .async_save import BackgroundSaveError
from .checkpointer import Checkpointer, PeriodicCheckpointer
from .model_loading import load_model_state_dict
from .serialization import CheckpointError, UnsafeCheckpointError

__all__ = [
    "Checkpointer",
    "PeriodicCheckpointer",
    "CheckpointError",
    "BackgroundSaveError",
    "UnsafeCheckpointError",
    "load_model_state_dict",
]

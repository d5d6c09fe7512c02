"""The training engine: the loop (train_loop), hooks, and (later) DefaultTrainer and launch."""
from .train_loop import AMPTrainer, HookBase, SimpleTrainer, TrainerBase
from . import hooks

__all__ = ["HookBase", "TrainerBase", "SimpleTrainer", "AMPTrainer", "hooks"]

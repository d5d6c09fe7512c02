"""The training engine: the loop and hooks (config-free), the launcher, and DefaultTrainer (config-driven)."""
from . import hooks
from .compile import compile_model
from .launch import launch
from .train_loop import AMPTrainer, HookBase, SimpleTrainer, TrainerBase
from .parallel import create_fsdp_model
from .defaults import (
    DefaultTrainer,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    default_writers,
)

__all__ = [
    "HookBase",
    "TrainerBase",
    "SimpleTrainer",
    "AMPTrainer",
    "hooks",
    "compile_model",
    "launch",
    "DefaultTrainer",
    "create_ddp_model",
    "create_fsdp_model",
    "default_argument_parser",
    "default_setup",
    "default_writers",
]

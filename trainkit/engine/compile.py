"""torch.compile for a training run: compile a model in place, and find out at start whether it can work.

torch.compile compiles lazily, at the first call. On a machine where code generation cannot work (no C++
compiler for the CPU backend, no Triton for the GPU one) that call fails deep inside the first training step
with a long compiler traceback. :func:`compile_model` compiles and runs a two-operation probe first, so that
such a machine is named before training starts; an ordinary model that fails to compile later still raises
torch's own error.
"""
import logging
from typing import Callable

import torch
from torch import nn

__all__ = ["CompileUnavailableError", "compile_model"]

logger = logging.getLogger(__name__)


class CompileUnavailableError(RuntimeError):
    """torch.compile cannot generate code on this machine (for this backend and device)."""


def _probe(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x * 2.0 + 1.0)


def compile_model(
    model: nn.Module, mode: str = "default", backend: str = "inductor", *, off_switch: str = "compile=False"
) -> nn.Module:
    """Compiles ``model``'s forward with torch.compile, in place (``nn.Module.compile``), and returns it.

    In place rather than ``torch.compile(model)``: the model keeps its class and its ``state_dict`` keys
    (``torch.compile(model)`` returns a wrapper whose keys start with ``_orig_mod.``), so its checkpoints
    load into a plain model and back. Compile the module inside a DistributedDataParallel wrapper, before
    wrapping it (torch's advice: "Where to apply torch.compile?" in its docs).

    Args:
        model: the model, on its device.
        mode: torch.compile's ``mode``.
        backend: torch.compile's ``backend``.
        off_switch: how the caller turns compilation off, named in the error (e.g. ``"MODEL.COMPILE False"``).

    Raises:
        CompileUnavailableError: the probe failed to compile or to run: this machine cannot compile with
            ``backend`` (the message says why and names ``off_switch``).
    """
    device = next(model.parameters(), torch.empty(0)).device
    _check_can_compile(torch.compile(_probe, mode=mode, backend=backend), device, backend, off_switch)
    model.compile(mode=mode, backend=backend)
    logger.info("Compiled the model with torch.compile (mode %r, backend %r) for device %s", mode, backend, device)
    return model


def _check_can_compile(probe: Callable, device: torch.device, backend: str, off_switch: str) -> None:
    x = torch.arange(8, dtype=torch.float32, device=device)
    try:
        ok = torch.equal(probe(x), _probe(x))
    except Exception as e:  # torch raises many kinds here (BackendCompilerFailed, CppCompileError, ...)
        what = "a C++ compiler (g++ or clang++ on the PATH, or the CXX variable)" if device.type == "cpu" else "Triton"
        raise CompileUnavailableError(
            f"torch.compile cannot compile on this machine with backend {backend!r} for {device.type}: compiling a "
            f"two-operation function failed with {type(e).__name__}: {str(e).strip()[:500]}\n"
            f"The {backend!r} backend on {device.type} needs {what}. Install it, or train without compiling: "
            f"{off_switch}."
        ) from e
    if not ok:
        raise CompileUnavailableError(
            f"torch.compile with backend {backend!r} computed a wrong result for a two-operation function on "
            f"{device.type}; train without compiling: {off_switch}."
        )

"""Seeding, RNG state capture and environment information."""
import os
import platform
import random
import sys
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch

__all__ = ["seed_all_rng", "get_rng_state", "set_rng_state", "preserve_rng_state", "collect_env_info"]


def seed_all_rng(seed: Optional[int] = None) -> int:
    """Seeds Python's ``random``, NumPy and torch (CPU and CUDA).

    Args:
        seed: the seed; None draws one from the OS (logged by the caller so a run can be repeated).

    Returns:
        the seed used.
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return seed


def get_rng_state() -> Dict[str, Any]:
    """The state of Python's, NumPy's and torch's (CPU, and CUDA if initialised) global RNGs.

    Made of tensors and plain Python data only, so it can go into a checkpoint loaded with
    ``torch.load(weights_only=True)``.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores what :func:`get_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state((npst["name"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserve_rng_state() -> Iterator[None]:
    """Runs the body and then restores every global RNG to its state before it."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def collect_env_info() -> str:
    """A short table of the software and hardware this process runs on, for logs and bug reports."""
    import fvcore  # noqa: F401  (version below)
    import yacs  # noqa: F401

    from trainkit import __version__

    def version(module: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(module)
        except Exception:  # pragma: no cover - not installed as a distribution
            return "unknown"

    rows = [
        ("sys.platform", sys.platform),
        ("Python", sys.version.replace("\n", " ")),
        ("machine", platform.machine()),
        ("trainkit", __version__),
        ("PyTorch", torch.__version__),
        ("torch threads", str(torch.get_num_threads())),
        ("CUDA available", str(torch.cuda.is_available())),
        ("numpy", np.__version__),
        ("fvcore", version("fvcore")),
        ("yacs", version("yacs")),
        ("tensorboard", version("tensorboard")),
    ]
    if torch.cuda.is_available():
        rows.append(("CUDA (torch built with)", str(torch.version.cuda)))
        for i in range(torch.cuda.device_count()):
            rows.append((f"GPU {i}", torch.cuda.get_device_name(i)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

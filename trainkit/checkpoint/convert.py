"""Convert a trusted checkpoint that ``weights_only=True`` refuses into one it accepts.

Usage::

    python -m trainkit.checkpoint.convert OLD.pth NEW.pth

This is the one place in trainkit that loads a file with unrestricted pickle, and so runs whatever code the
file carries. Use it only on files whose origin you trust, once; then load ``NEW.pth`` as usual. numpy arrays
become tensors and numpy scalars become Python numbers; any other object is reported, not guessed at.
"""
import argparse
import collections
import logging
import pickle
from typing import Any, List, Optional

import numpy as np
import torch

from .serialization import atomic_save, check_weights_only_loadable

__all__ = ["convert_trusted_checkpoint", "main"]

logger = logging.getLogger(__name__)


def _to_plain(value: Any) -> Any:
    """``value`` with numpy data turned into tensors/Python numbers, containers converted recursively."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        items = ((key, _to_plain(item)) for key, item in value.items())
        return collections.OrderedDict(items) if isinstance(value, collections.OrderedDict) else dict(items)
    if type(value) in (list, tuple, set):
        return type(value)(_to_plain(item) for item in value)
    return value


def _load_trusted(path: str) -> Any:
    """Load ``path`` with unrestricted pickle (runs the file's code): a ``.pkl`` pickle or a torch.save file."""
    if path.endswith(".pkl"):
        # Plain pickles, e.g. detectron2's model-zoo files, which store numpy arrays.
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    return torch.load(path, map_location="cpu", weights_only=False)


def convert_trusted_checkpoint(src: str, dst: str) -> None:
    """Re-save ``src`` as ``dst`` in a form that loads with ``torch.load(weights_only=True)``.

    Runs the code in ``src``'s pickle: only for files you trust.

    Args:
        src: the trusted checkpoint: a torch.save file, or a plain pickle if its name ends in ``.pkl``.
        dst: where to write the converted checkpoint (atomically).

    Raises:
        TypeError: ``src`` holds an object other than tensors, numpy data and plain Python data; the message
            names where it is. Extract what you need from it by hand.
    """
    logger.warning("Loading %s with unrestricted pickle: this runs any code it carries.", src)
    data = _to_plain(_load_trusted(src))
    check_weights_only_loadable(data, name=f"'{src}'")
    atomic_save(data, dst)
    logger.info("Wrote %s; it loads with weights_only=True.", dst)


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point: ``python -m trainkit.checkpoint.convert SRC DST``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="trusted checkpoint to convert (its pickled code WILL run)")
    parser.add_argument("dst", help="output file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    convert_trusted_checkpoint(args.src, args.dst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

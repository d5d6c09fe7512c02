"""Named data sets and their metadata.

``DatasetCatalog`` maps a name to a function that builds a map-style ``torch.utils.data.Dataset``;
``MetadataCatalog`` maps the same name to a :class:`Metadata` object with free-form attributes
(``evaluator_type``, ``num_classes``, ``thing_classes``, ...). Both are process-global, as in detectron2:
register in a module that every process imports (spawned workers re-import it).
"""
import logging
from typing import Any, Callable, Dict, List

from torch.utils.data import Dataset

__all__ = ["DatasetCatalog", "MetadataCatalog", "Metadata"]

logger = logging.getLogger(__name__)


class _DatasetCatalog:
    """Name -> function that returns a map-style dataset. Use the global instance ``DatasetCatalog``.

    The function is called on every :meth:`get`, so it should be cheap or cache its raw arrays itself.
    """

    def __init__(self) -> None:
        self._funcs: Dict[str, Callable[[], Dataset]] = {}

    def register(self, name: str, func: Callable[[], Dataset]) -> None:
        """Registers ``func`` under ``name``.

        Args:
            name: the data set's name, e.g. ``"digits_train"``.
            func: called with no arguments; returns a map-style dataset (``__getitem__`` and ``__len__``).

        Raises:
            ValueError: ``name`` is already registered.
            TypeError: ``func`` is not callable.
        """
        if not callable(func):
            raise TypeError(f"DatasetCatalog.register({name!r}, func): func must be callable, got {func!r}.")
        if name in self._funcs:
            raise ValueError(
                f"Dataset {name!r} is already registered. Pick another name, or call "
                f"DatasetCatalog.remove({name!r}) first to replace it."
            )
        self._funcs[name] = func

    def get(self, name: str) -> Dataset:
        """Calls the function registered under ``name`` and returns its dataset.

        Raises:
            KeyError: ``name`` is not registered; the message lists the registered names.
        """
        try:
            func = self._funcs[name]
        except KeyError:
            raise KeyError(
                f"Dataset {name!r} is not registered. Registered datasets: {', '.join(self.list()) or '(none)'}. "
                "Register it with DatasetCatalog.register(name, func)."
            ) from None
        return func()

    def list(self) -> List[str]:
        """The registered names, sorted."""
        return sorted(self._funcs)

    def remove(self, name: str) -> None:
        """Unregisters ``name`` (a no-op for its metadata). Raises KeyError if it is not registered."""
        if name not in self._funcs:
            raise KeyError(f"Dataset {name!r} is not registered; cannot remove it.")
        del self._funcs[name]

    def __contains__(self, name: str) -> bool:
        return name in self._funcs


class Metadata:
    """Free-form attributes of a data set (``evaluator_type``, ``num_classes``, ...).

    Set attributes with :meth:`set` or plain assignment. Changing an attribute that is already set to a
    different value is an error: metadata is shared by every user of the name, and a silent overwrite is
    almost always a bug (two registrations that disagree).
    """

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)

    def __getattr__(self, key: str) -> Any:
        # Only called when normal lookup fails, i.e. for attributes that were never set.
        if key.startswith("__"):
            raise AttributeError(key)
        raise AttributeError(
            f"Metadata of dataset {self.name!r} has no attribute {key!r}. "
            f"Available: {sorted(self.as_dict())}. Set it with MetadataCatalog.get({self.name!r}).set({key}=...)."
        )

    def __setattr__(self, key: str, value: Any) -> None:
        old = self.__dict__.get(key, _MISSING)
        if old is not _MISSING and old != value:
            raise ValueError(
                f"Metadata {key!r} of dataset {self.name!r} is already {old!r}; refusing to change it to "
                f"{value!r}. Use a new dataset name, or MetadataCatalog.remove({self.name!r}) first."
            )
        object.__setattr__(self, key, value)

    def set(self, **kwargs: Any) -> "Metadata":
        """Sets several attributes at once; returns ``self`` so calls can be chained."""
        for key, value in kwargs.items():
            setattr(self, key, value)
        return self

    def get(self, key: str, default: Any = None) -> Any:
        """The attribute ``key``, or ``default`` when it is not set."""
        return self.__dict__.get(key, default)

    def as_dict(self) -> Dict[str, Any]:
        """A copy of all attributes, ``name`` included."""
        return dict(self.__dict__)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"Metadata({items})"


_MISSING = object()


class _MetadataCatalog:
    """Name -> :class:`Metadata`. Use the global instance ``MetadataCatalog``."""

    def __init__(self) -> None:
        self._metadata: Dict[str, Metadata] = {}

    def get(self, name: str) -> Metadata:
        """The metadata of ``name``, created empty on first access (so it can be set before or after the
        dataset is registered)."""
        if name not in self._metadata:
            self._metadata[name] = Metadata(name)
        return self._metadata[name]

    def list(self) -> List[str]:
        """Names that have metadata, sorted."""
        return sorted(self._metadata)

    def remove(self, name: str) -> None:
        """Forgets the metadata of ``name``. Raises KeyError if there is none."""
        if name not in self._metadata:
            raise KeyError(f"No metadata for dataset {name!r}; cannot remove it.")
        del self._metadata[name]


DatasetCatalog = _DatasetCatalog()
MetadataCatalog = _MetadataCatalog()

"""CfgNode and get_cfg: yacs configs with ``_BASE_`` inheritance and errors that say what to fix.

A merge (from a file, a list of command-line overrides or another config) is checked against the keys and value
types of the config it merges into. It is all or nothing: it runs on a copy, and the config changes only when
every key and value was accepted.

Type rules (the type of the current value decides):

- same type: accepted. ``list`` and ``tuple`` are interchangeable (converted to the current type).
- an ``int`` where a ``float`` is expected: accepted and converted (``BASE_LR: 1`` means 1.0).
- ``None``, or any value where the current value is ``None``: accepted (as in yacs).
- anything else (a ``str`` where a number is expected, a ``float`` where an ``int`` is expected, a ``bool`` where
  a number is expected): ``TypeError`` naming the key, the value and the expected type.
- lists and tuples whose current elements all have one scalar type: each new element follows the rules above.

String values, from the command line or from YAML, are parsed with yacs' rules (``ast.literal_eval``, falling
back to the plain string), so ``SOLVER.STEPS "(100, 200)"`` gives a tuple. One refinement: a key whose current
value is a string always gets a string, so ``OUTPUT_DIR 2024`` is the folder ``"2024"``, not an error, and a
dumped config loads back unchanged.
"""
import ast
import copy
import difflib
import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import yaml
from yacs.config import CfgNode as _YacsCfgNode

__all__ = ["CfgNode", "ConfigKeyError", "get_cfg"]

logger = logging.getLogger(__name__)

BASE_KEY = "_BASE_"
_SCALAR_TYPES = (str, int, float, bool)
_VALID_TYPES = (tuple, list, str, int, float, bool, type(None))
_ALL_KEYS_HINT = "trainkit/config/defaults.py lists every key"


class ConfigKeyError(KeyError):
    """A config key that does not exist.

    A ``KeyError`` whose text prints without the quotes ``KeyError`` adds, so the message reads
    ``KeyError: Non-existent config key: SOLVER.BASE_LRR (did you mean SOLVER.BASE_LR?)``.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CfgNode(_YacsCfgNode):
    """A yacs ``CfgNode`` with ``_BASE_`` inheritance, checked merges and clear errors.

    Attribute access (``cfg.SOLVER.BASE_LR``), ``clone()``, ``freeze()`` and ``defrost()`` are yacs'. The merge
    methods are replaced; see the module docstring for the type rules they apply.
    """

    def merge_from_file(self, cfg_filename: str) -> None:
        """Merges a YAML file, after the chain of files its ``_BASE_`` key names.

        ``_BASE_: ../Base.yaml`` in a file names a file that is merged first; the path is relative to the folder
        of the file that names it (absolute paths and ``~`` work too). Bases may have bases, to any depth; a
        file that (indirectly) names itself is an error.

        Args:
            cfg_filename: path of a YAML file whose top level is a mapping of keys to values.

        Raises:
            FileNotFoundError: a file of the chain does not exist (the message names it and its includer).
            OSError: a file cannot be read.
            ValueError: malformed YAML, a top level that is not a mapping, a bad ``_BASE_`` or a cycle.
            ConfigKeyError: a key that does not exist (the message names the nearest valid key).
            TypeError: a value of the wrong type (the message names the key, value and expected type).
        """
        self._merge_staged(lambda staged: _merge_file_chain(staged, os.fspath(cfg_filename), []))

    def merge_from_list(self, cfg_list: Sequence[Any]) -> None:
        """Merges ``KEY VALUE`` pairs, e.g. the ``opts`` of a command line.

        Args:
            cfg_list: ``["SOLVER.BASE_LR", "0.1", "SOLVER.STEPS", "(100, 200)"]``. String values are parsed
                with yacs' literal-eval rules; other values are used as they are.

        Raises:
            ValueError: an odd number of items.
            ConfigKeyError, TypeError: as for :meth:`merge_from_file`.
        """
        cfg_list = list(cfg_list)
        if len(cfg_list) % 2 != 0:
            raise ValueError(
                f"merge_from_list needs KEY VALUE pairs, got an odd number of items ({len(cfg_list)}): {cfg_list}; "
                f"the key {cfg_list[-1]!r} has no value"
            )
        self._merge_staged(lambda staged: _merge_pairs(staged, cfg_list))

    def merge_from_other_cfg(self, cfg_other: _YacsCfgNode) -> None:
        """Merges another config (e.g. one a user built in Python) into this one, with the same checks."""
        self._merge_staged(lambda staged: _merge_mapping(staged, cfg_other, [], "another config", root=staged))

    def dump(self, **kwargs: Any) -> str:
        """Returns the config as YAML text (yacs' format: keys sorted, tuples written as lists).

        The text loads back into an equal config with ``get_cfg().merge_from_file``.

        Args:
            **kwargs: passed to ``yaml.safe_dump``.
        """
        return super().dump(**kwargs)

    def dump_to(self, output_dir: str, filename: str = "config.yaml") -> str:
        """Writes :meth:`dump` to ``output_dir/filename`` and returns that path.

        The folder is created if needed. The file is written to a temporary name and renamed into place, so a
        crash never leaves half a config. In distributed runs call it on the main process only.
        """
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, filename)
        tmp_path = f"{path}.tmp.{os.getpid()}"
        with open(tmp_path, "w") as f:
            f.write(self.dump())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        logger.info("Wrote the config to %s", path)
        return path

    def _merge_staged(self, merge: Callable[[_YacsCfgNode], None]) -> None:
        """Runs ``merge`` on a copy, then copies the result in: a merge that fails changes nothing."""
        if self.is_frozen():
            raise AttributeError("Cannot merge into a frozen config; call cfg.defrost() first")
        staged = self.clone()
        merge(staged)
        _copy_values(staged, self)


def get_cfg() -> CfgNode:
    """Returns a fresh copy of the default config (``trainkit/config/defaults.py``).

    Each call returns a new object; changing it never changes the defaults.
    """
    from .defaults import _C

    return CfgNode(_C.clone())


# The merge machinery. The functions take any yacs node, so sub-nodes a user built with yacs' own CfgNode merge
# the same way.


def _merge_file_chain(cfg: _YacsCfgNode, path: str, includers: List[str]) -> None:
    data = _read_yaml_mapping(path, includers[-1] if includers else None)
    base = data.pop(BASE_KEY, None)
    if base is not None:
        if not isinstance(base, str):
            raise ValueError(f"{BASE_KEY} in {path} must be one path string, got {base!r}")
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), os.path.expanduser(base)))
        chain = includers + [path]
        _check_no_cycle(base_path, chain)
        _merge_file_chain(cfg, base_path, chain)
    _merge_mapping(cfg, data, [], path, root=cfg)


def _merge_pairs(cfg: _YacsCfgNode, cfg_list: List[Any]) -> None:
    source = "the command-line overrides"
    for full_key, value in zip(cfg_list[0::2], cfg_list[1::2]):
        if not isinstance(full_key, str):
            raise TypeError(f"Config keys must be strings like 'SOLVER.BASE_LR', got {full_key!r}")
        if _skip_deprecated_or_renamed(cfg, full_key):
            continue
        *parents, leaf = full_key.split(".")
        node = cfg
        for name in parents:
            node = node.get(name)
            if not isinstance(node, _YacsCfgNode):
                raise _unknown_key_error(cfg, full_key, source)
        _merge_value(node, leaf, value, parents, source, root=cfg)


def _merge_mapping(node: _YacsCfgNode, data: Dict[str, Any], key_list: List[str], source: str, root) -> None:
    for key, value in data.items():
        _merge_value(node, key, value, key_list, source, root)


def _merge_value(node: _YacsCfgNode, key: str, value: Any, key_list: List[str], source: str, root) -> None:
    full_key = ".".join(key_list + [str(key)])
    if key not in node:
        if node.is_new_allowed():
            node[key] = _decode(value, None)
            return
        if _skip_deprecated_or_renamed(root, full_key):
            return
        raise _unknown_key_error(root, full_key, source)
    current = node[key]
    value = _decode(value, current)
    if isinstance(current, _YacsCfgNode):
        if not isinstance(value, dict):
            raise TypeError(
                f"Config key {full_key} is a group of keys, got {value!r} in {source}; "
                f"set its keys one by one, e.g. {full_key}.{next(iter(current), 'KEY')}"
            )
        _merge_mapping(current, value, key_list + [key], source, root)
    elif isinstance(value, dict):
        raise TypeError(
            f"Config key {full_key} is a single value ({current!r}), got a mapping {dict(value)!r} in {source}"
        )
    else:
        node[key] = _check_type(value, current, full_key, source)


def _skip_deprecated_or_renamed(root: _YacsCfgNode, full_key: str) -> bool:
    """yacs' renamed keys raise; its deprecated keys are logged and skipped."""
    if root.key_is_renamed(full_key):
        root.raise_key_rename_error(full_key)
    return root.key_is_deprecated(full_key)


def _unknown_key_error(root: _YacsCfgNode, full_key: str, source: str) -> ConfigKeyError:
    matches = difflib.get_close_matches(full_key, list(_dotted_keys(root)), n=1)
    hint = f"did you mean {matches[0]}?" if matches else f"no similar key; {_ALL_KEYS_HINT}"
    return ConfigKeyError(f"Non-existent config key: {full_key} ({hint}), set in {source}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: safe_load silently keeps the
    second value, so a config that sets a key twice would train with one of them unnoticed."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Dict[Any, Any]:
    first_line: Dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in first_line:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark,
                f"found the key {key!r} twice (first on line {first_line[key] + 1}); keep one of them",
                key_node.start_mark,
            )
        first_line[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _read_yaml_mapping(path: str, includer: Optional[str]) -> Dict[str, Any]:
    """Reads a YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    where = f" (the {BASE_KEY} of {includer})" if includer else ""
    try:
        f = open(path, "r", encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"Config file not found: {path}{where}") from None
    except OSError as err:
        raise type(err)(f"Cannot read config file {path}{where}: {err.strerror or err}") from err
    with f:
        try:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # reading from the file lets YAML's errors name it
        except yaml.YAMLError as err:
            raise ValueError(f"Malformed YAML in config file {path}{where}:\n{err}") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"Config file {path}{where} is not UTF-8 text: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"Config file {path}{where} must hold a mapping of KEY: value at its top level, "
            f"got a {type(data).__name__}"
        )
    return data


def _check_no_cycle(base_path: str, chain: List[str]) -> None:
    real_chain = [os.path.realpath(p) for p in chain]
    real_base = os.path.realpath(base_path)
    if real_base in real_chain:
        cycle = chain[real_chain.index(real_base) :] + [base_path]
        raise ValueError(f"{BASE_KEY} cycle: " + " -> ".join(cycle) + "; remove one of these _BASE_ keys")


def _decode(value: Any, current: Any) -> Any:
    """Parses a string with yacs' literal-eval rules; a string-valued key keeps the text (see module doc)."""
    if isinstance(value, dict):
        return CfgNode(value)
    if not isinstance(value, str):
        return value
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
    if isinstance(current, str) and not isinstance(parsed, str):
        return value
    return parsed


def _check_type(value: Any, current: Any, full_key: str, source: str) -> Any:
    """Returns ``value`` converted to the type of ``current``, or raises TypeError (rules: module doc)."""
    if value is None or current is None:
        if not isinstance(value, _VALID_TYPES):
            raise TypeError(
                f"Config key {full_key} got {value!r} ({type(value).__name__}) in {source}; "
                f"values must be one of {', '.join(t.__name__ for t in _VALID_TYPES)}"
            )
        return value
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(current)(_check_elements(value, current, full_key, source))
    converted = _convert_scalar(value, current)
    if converted is _MISMATCH:
        raise TypeError(
            f"Config key {full_key} expects type {type(current).__name__}, got {value!r} "
            f"({type(value).__name__}) in {source}; use a value like the current one, {current!r}"
        )
    return converted


_MISMATCH = object()


def _convert_scalar(value: Any, current: Any) -> Any:
    if type(value) is type(current):
        return value
    if type(current) is float and type(value) is int:
        return float(value)
    return _MISMATCH


def _check_elements(value: Sequence[Any], current: Sequence[Any], full_key: str, source: str) -> List[Any]:
    element_types = {type(x) for x in current}
    if len(element_types) != 1 or not issubclass(next(iter(element_types)), _SCALAR_TYPES):
        return list(value)
    example = current[0]
    converted = [_convert_scalar(x, example) for x in value]
    for x, c in zip(value, converted):
        if c is _MISMATCH:
            raise TypeError(
                f"Config key {full_key} expects a list of {type(example).__name__}, got {list(value)!r} in "
                f"{source}: {x!r} is a {type(x).__name__}; use values like the current ones, {list(current)!r}"
            )
    return converted


def _dotted_keys(node: _YacsCfgNode, prefix: str = "") -> Iterable[str]:
    for key, value in node.items():
        full_key = f"{prefix}{key}"
        yield full_key
        if isinstance(value, _YacsCfgNode):
            yield from _dotted_keys(value, full_key + ".")


def _copy_values(src: _YacsCfgNode, dst: _YacsCfgNode) -> None:
    """Copies every value of ``src`` into ``dst`` in place, so references to dst's sub-nodes stay valid."""
    for key, value in src.items():
        target = dst.get(key)
        if isinstance(value, _YacsCfgNode) and isinstance(target, _YacsCfgNode):
            _copy_values(value, target)
        else:
            dict.__setitem__(dst, key, copy.deepcopy(value))

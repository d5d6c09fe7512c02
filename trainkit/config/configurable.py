"""``@configurable``: let a class or a function take either plain arguments or a config, as in detectron2.

A class decorates its ``__init__`` and gives a ``from_config`` classmethod that turns a config into the
``__init__`` arguments::

    @MODEL_REGISTRY.register()
    class Net(nn.Module):
        @configurable
        def __init__(self, hidden: int, dropout: float = 0.0):
            ...

        @classmethod
        def from_config(cls, cfg):
            return {"hidden": cfg.MODEL.MLP.HIDDEN_DIMS[0], "dropout": cfg.MODEL.MLP.DROPOUT}

    Net(hidden=64)            # plain arguments
    Net(cfg)                  # from the config (this is how build_model calls a registered model)
    Net(cfg, dropout=0.5)     # from the config, with dropout given explicitly

A function takes its ``from_config`` as an argument of the decorator:
``@configurable(from_config=lambda cfg: {"lr": cfg.SOLVER.BASE_LR})``.

How a call with a config is split: positional arguments after the config, and keyword arguments that
``from_config`` names, go to ``from_config``; the other keyword arguments override what it returns.
"""
import functools
import inspect
from typing import Any, Callable, Dict, Optional, Tuple

from yacs.config import CfgNode as _YacsNode

__all__ = ["configurable"]


def configurable(init_func: Optional[Callable] = None, *, from_config: Optional[Callable] = None) -> Callable:
    """Decorates a class's ``__init__`` (bare ``@configurable``) or a function (``@configurable(from_config=f)``)
    so that it can be called with a config as its first argument (or as ``cfg=``).

    Args:
        init_func: the ``__init__`` being decorated (bare form). The class must have a ``from_config``
            classmethod whose first argument, after ``cls``, is the config.
        from_config: for a function: a callable whose first argument is the config and which returns a dict of
            the function's arguments.

    Raises:
        TypeError: at decoration, a bare ``@configurable`` on something other than an ``__init__``, or
            ``from_config`` given for an ``__init__``; at a call with a config, a class without a
            ``from_config`` classmethod, arguments that ``from_config`` cannot take, or a ``from_config`` that
            returns something other than a dict.
    """
    if init_func is not None:
        if not inspect.isfunction(init_func) or init_func.__name__ != "__init__" or from_config is not None:
            raise TypeError(
                "Bare @configurable decorates a class's __init__ (with a from_config classmethod on the class); "
                "decorate a function with @configurable(from_config=...) instead."
            )
        return _configurable_init(init_func)
    if from_config is None:
        raise TypeError(
            "@configurable() needs from_config=...: use bare @configurable on a class's __init__, or "
            "@configurable(from_config=f) on a function."
        )
    if not callable(from_config):
        raise TypeError(f"@configurable(from_config=...) must be a callable taking the config, got {from_config!r}")

    def decorator(func: Callable) -> Callable:
        if inspect.isfunction(func) and func.__name__ == "__init__":
            raise TypeError(
                "Decorate __init__ with bare @configurable and give the class a from_config classmethod; "
                "from_config=... is for functions."
            )

        @functools.wraps(func)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if _called_with_cfg(args, kwargs):
                return func(**_args_from_config(from_config, func.__qualname__, args, kwargs))
            return func(*args, **kwargs)

        wrapped.from_config = from_config  # type: ignore[attr-defined]
        return wrapped

    return decorator


def _configurable_init(init_func: Callable) -> Callable:
    @functools.wraps(init_func)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> None:
        if not _called_with_cfg(args, kwargs):
            init_func(self, *args, **kwargs)
            return
        cls = type(self)
        from_config = getattr(cls, "from_config", None)
        if from_config is None:
            raise TypeError(
                f"{cls.__name__} was called with a config, but it has no from_config classmethod. Add "
                "`@classmethod def from_config(cls, cfg): return {...}` returning the __init__ arguments."
            )
        if not inspect.ismethod(from_config) or from_config.__self__ is not cls:
            raise TypeError(
                f"{cls.__name__}.from_config must be a @classmethod (it is called as cls.from_config(cfg))."
            )
        init_func(self, **_args_from_config(from_config, f"{cls.__name__}.from_config", args, kwargs))

    return wrapped


def _called_with_cfg(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    return bool(args) and isinstance(args[0], _YacsNode) or isinstance(kwargs.get("cfg"), _YacsNode)


def _args_from_config(
    from_config: Callable, name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Dict[str, Any]:
    # Keyword arguments that from_config names (besides the config) are its own; the rest override its result.
    params = inspect.signature(from_config).parameters
    takes_any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    own = {k: v for k, v in kwargs.items() if takes_any_keyword or k in params}
    overrides = {k: v for k, v in kwargs.items() if k not in own}
    try:
        inspect.signature(from_config).bind(*args, **own)
    except TypeError as e:
        raise TypeError(
            f"{name} cannot take these arguments ({e}). Called with a config, positional arguments after the config "
            f"go to from_config, whose signature is {inspect.signature(from_config)}; pass the other arguments by "
            "keyword to override what from_config returns."
        ) from None
    ret = from_config(*args, **own)
    if not isinstance(ret, dict):
        raise TypeError(f"{name} must return a dict of arguments, got {type(ret).__name__}: {ret!r}")
    return {**ret, **overrides}

"""Configs: ``get_cfg()`` returns the defaults as a ``CfgNode``; see docs/config.md."""
from .config import CfgNode, ConfigKeyError, get_cfg
from .configurable import configurable

__all__ = ["CfgNode", "ConfigKeyError", "configurable", "get_cfg"]

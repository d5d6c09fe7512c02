"""Configs: ``get_cfg()`` returns the defaults as a ``CfgNode``; see docs/config.md."""
from .config import CfgNode, ConfigKeyError, get_cfg

__all__ = ["CfgNode", "ConfigKeyError", "get_cfg"]

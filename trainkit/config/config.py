"""CfgNode and get_cfg (minimal; _BASE_ inheritance and clear errors come with the config work)."""
from yacs.config import CfgNode as _YacsCfgNode

__all__ = ["CfgNode", "get_cfg"]


class CfgNode(_YacsCfgNode):
    """A yacs CfgNode."""


def get_cfg() -> CfgNode:
    """Returns a fresh copy of the default config."""
    from .defaults import _C

    return CfgNode(_C.clone())

"""trainkit: a small, fast, trustworthy PyTorch training engine in the style of detectron2's engine."""

__version__ = "0.1.0"

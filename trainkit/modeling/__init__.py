"""Models: the ``MODEL_REGISTRY``, ``build_model`` and the built-in classifiers."""
from .build import MODEL_REGISTRY, build_model
from .classifiers import ClassifierBase, ConvNetClassifier, MLPClassifier
from .summary import parameter_summary

__all__ = ["MODEL_REGISTRY", "build_model", "ClassifierBase", "MLPClassifier", "ConvNetClassifier", "parameter_summary"]

"""Evaluation: the evaluator protocol, the inference loop and the built-in classification evaluator."""
from .classification import ClassificationEvaluator
from .evaluator import DatasetEvaluator, DatasetEvaluators, inference_context, inference_on_dataset
from .testing import flatten_results_dict, print_csv_format

__all__ = [
    "DatasetEvaluator",
    "DatasetEvaluators",
    "inference_on_dataset",
    "inference_context",
    "ClassificationEvaluator",
    "print_csv_format",
    "flatten_results_dict",
]

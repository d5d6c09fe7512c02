import logging

from trainkit.evaluation import flatten_results_dict, print_csv_format


def test_print_csv_format_logs_names_then_values_per_task(caplog):
    caplog.set_level(logging.INFO, logger="trainkit.evaluation.testing")
    print_csv_format({"classification": {"top1": 97.22222, "top5": 100.0, "top1-cat": 50.0}, "loss": 0.5})
    assert [r.getMessage() for r in caplog.records] == [
        "copypaste: Task: classification",
        "copypaste: top1,top5",
        "copypaste: 97.2222,100.0000",
        "copypaste: loss=0.5",
    ]


def test_flatten_results_dict_joins_keys_with_slashes():
    results = {"classification": {"top1": 1.0, "top5": 2.0}, "a": {"b": {"c": 3}}, "d": 4}
    assert flatten_results_dict(results) == {"classification/top1": 1.0, "classification/top5": 2.0, "a/b/c": 3, "d": 4}

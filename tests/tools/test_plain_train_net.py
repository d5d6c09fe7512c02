"""tools/plain_train_net.py end to end: the same short job as tests/tools/test_train_net.py, by hand-written loop."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.tools.cli import CONFIG, LOGGED_60, LOGGED_80, SHORT_RUN, logged_classification, read_metrics, run_tool


@pytest.fixture
def runs(tool_runs):
    return tool_runs["plain_train_net.py"]


def test_training_writes_metrics_and_checkpoints(runs):
    metrics = read_metrics(runs.after_60)
    assert [m["iteration"] for m in metrics] == LOGGED_60
    for m in metrics:
        assert {"total_loss", "loss_cls", "lr"} <= m.keys()
    assert [m["iteration"] for m in metrics if "classification/top1" in m] == [19, 39, 59]
    assert (runs.after_60 / "last_checkpoint").read_text() == "model_final.pth"
    assert (runs.after_60 / "config.yaml").is_file() and (runs.after_60 / "log.txt").is_file()


def test_resume_continues_after_the_last_checkpoint_without_repeating_iterations(runs):
    assert "Starting training from iteration 60" in runs.resume.stdout
    assert [m["iteration"] for m in read_metrics(runs.out)] == LOGGED_80


def test_eval_only_reports_the_accuracy_training_reported_for_the_final_model(runs):
    final_line = read_metrics(runs.after_60)[-1]
    results = logged_classification(runs.evaluate.stdout)
    assert (results["top1"], results["top5"]) == (final_line["classification/top1"], final_line["classification/top5"])


def test_it_is_the_same_job_as_train_net(runs, tool_runs):
    # Same config, same seed, same parts: the same losses, learning rates and accuracies, to the last bit.
    keys = ("iteration", "loss_cls", "total_loss", "lr", "classification/top1", "classification/top5")
    plain = [{k: m[k] for k in keys if k in m} for m in read_metrics(runs.after_60)]
    trainer = [{k: m[k] for k in keys if k in m} for m in read_metrics(tool_runs["train_net.py"].after_60)]
    assert plain == trainer


def test_its_accumulation_loop_is_the_same_job_as_train_nets_accumulation(tmp_path):
    # GRAD_ACCUM_STEPS 4 over IMS_PER_BATCH 64: both tools step on four micro-batches of 16, to the last bit.
    opts = [*SHORT_RUN, "SOLVER.MAX_ITER", "20", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
            "SOLVER.GRAD_ACCUM_STEPS", "4"]
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(
            lambda s: run_tool(s, "--config-file", CONFIG, *opts, "OUTPUT_DIR", str(tmp_path / s)),
            ("plain_train_net.py", "train_net.py"),
        ))
    assert all("batches of 16 per process x 1 processes (64 per optimizer step)" in p.stdout + p.stderr for p in done)
    keys = ("iteration", "loss_cls", "total_loss", "lr")
    plain, trainer = ([{k: m[k] for k in keys} for m in read_metrics(tmp_path / s)]
                      for s in ("plain_train_net.py", "train_net.py"))
    assert [m["iteration"] for m in plain] == [9, 19]
    assert plain == trainer

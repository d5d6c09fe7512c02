"""tools/train_net.py end to end, as a user runs it: a real subprocess per command.

The short digits run (60 iterations, then --eval-only, then --resume to 80) comes from the ``tool_runs``
fixture of conftest.py.
"""
import pytest

from tests.tools.cli import CONFIG, LOGGED_60, LOGGED_80, logged_classification, read_metrics, run_tool
from trainkit.config import get_cfg


@pytest.fixture
def runs(tool_runs):
    return tool_runs["train_net.py"]


def test_training_writes_every_logged_iteration_once_with_losses_timings_lr_and_evaluations(runs):
    metrics = read_metrics(runs.after_60)
    assert [m["iteration"] for m in metrics] == LOGGED_60
    for m in metrics:
        assert {"total_loss", "loss_cls", "lr", "time", "data_time"} <= m.keys()
    assert [m["iteration"] for m in metrics if "classification/top1" in m] == [19, 39, 59]
    assert metrics[-1]["classification/top1"] == logged_classification(runs.train.stdout)["top1"]


def test_tensorboard_event_file_has_the_logged_scalars_at_their_iterations(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs.after_60))
    events.Reload()
    metrics = read_metrics(runs.after_60)
    total_loss = events.Scalars("total_loss")
    assert [e.step for e in total_loss] == LOGGED_60
    assert [e.value for e in total_loss] == pytest.approx([m["total_loss"] for m in metrics], rel=1e-6)
    assert [e.step for e in events.Scalars("classification/top1")] == [19, 39, 59]


def test_output_dir_has_config_log_and_checkpoints_with_last_checkpoint_naming_the_final_one(runs):
    out = runs.after_60
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(p.name for p in out.glob("*.pth")) == [
        "model_0000019.pth", "model_0000039.pth", "model_0000059.pth", "model_final.pth"
    ]
    cfg = get_cfg()
    cfg.merge_from_file(str(out / "config.yaml"))
    assert (cfg.SOLVER.MAX_ITER, cfg.TEST.EVAL_PERIOD, cfg.OUTPUT_DIR) == (60, 20, str(runs.out))
    assert "Starting training from iteration 0" in (out / "log.txt").read_text()


def test_resume_continues_after_the_last_checkpoint_without_repeating_iterations(runs):
    assert "Resuming from iteration 60" in runs.resume.stdout
    assert "Starting training from iteration 60" in runs.resume.stdout
    assert [m["iteration"] for m in read_metrics(runs.out)] == LOGGED_80
    assert (runs.out / "model_0000079.pth").is_file() and (runs.out / "last_checkpoint").read_text() == "model_final.pth"


def test_eval_only_reports_the_accuracy_training_reported_for_the_final_model(runs):
    final_line = read_metrics(runs.after_60)[-1]
    results = logged_classification(runs.evaluate.stdout)
    assert (results["top1"], results["top5"]) == (final_line["classification/top1"], final_line["classification/top5"])
    assert f"Evaluation results: {{'classification': {results}}}" in runs.evaluate.stdout
    assert not list((runs.out.parent / "eval").glob("*.pth"))


def test_an_unknown_config_key_fails_naming_the_key_and_the_nearest_valid_one(tmp_path):
    proc = run_tool("train_net.py", "--config-file", CONFIG, "SOLVER.BASE_LRR", "0.1", "OUTPUT_DIR", str(tmp_path), expect_success=False)
    assert proc.returncode != 0
    assert "Non-existent config key: SOLVER.BASE_LRR (did you mean SOLVER.BASE_LR?)" in proc.stderr


def test_a_missing_config_file_fails_naming_the_path(tmp_path):
    proc = run_tool("train_net.py", "--config-file", "configs/digits/nope.yaml", expect_success=False)
    assert proc.returncode != 0
    assert "Config file not found: configs/digits/nope.yaml" in proc.stderr


def test_a_second_run_into_the_folder_of_a_live_run_fails_naming_the_folder_and_its_pid(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.tools.cli import REPO, SHORT_RUN

    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "tools/train_net.py", "--config-file", CONFIG, *SHORT_RUN, "SOLVER.MAX_ITER", "1000000",
         "OUTPUT_DIR", str(out)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "last_checkpoint").exists():  # the first run is training and saving
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start training"
            time.sleep(0.2)
        second = run_tool("train_net.py", "--config-file", CONFIG, "OUTPUT_DIR", str(out), expect_success=False)
        assert second.returncode != 0
        assert f"OUTPUT_DIR {str(out)!r} is in use by another run (PID {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_a_flag_after_the_overrides_is_an_error_that_says_to_move_it(tmp_path):
    proc = run_tool("train_net.py", "--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path), "--resume",
                    expect_success=False)
    assert proc.returncode == 2
    assert ("--resume comes after the KEY VALUE config overrides, where it would be read as a config key. Move it "
            "before them") in proc.stderr
    assert not (tmp_path / "config.yaml").exists()


def test_eval_only_without_weights_is_an_error_unless_random_weights_are_asked_for(tmp_path):
    refused = run_tool("train_net.py", "--config-file", CONFIG, "--eval-only", "OUTPUT_DIR", str(tmp_path / "a"),
                       expect_success=False)
    assert refused.returncode != 0
    assert "--eval-only needs weights to evaluate: give MODEL.WEIGHTS" in refused.stderr
    assert "Evaluation results" not in refused.stdout + refused.stderr
    baseline = run_tool("train_net.py", "--config-file", CONFIG, "--eval-only", "--random-weights",
                        "OUTPUT_DIR", str(tmp_path / "b"))
    assert logged_classification(baseline.stdout + baseline.stderr)["top1"] < 50  # an untrained model, on purpose


def test_a_fresh_run_over_an_earlier_runs_checkpoints_is_refused_and_start_over_keeps_them_aside(tmp_path):
    from tests.tools.cli import SHORT_RUN

    out = tmp_path / "run"
    run = ["--config-file", CONFIG, *SHORT_RUN, "SOLVER.MAX_ITER", "20", "OUTPUT_DIR", str(out)]
    run_tool("train_net.py", *run)
    first_final = (out / "model_final.pth").read_bytes()
    first_metrics = (out / "metrics.json").read_text()
    refused = run_tool("train_net.py", *run, expect_success=False)
    assert refused.returncode != 0
    assert f"OUTPUT_DIR {str(out)!r} holds the checkpoints of an earlier run" in refused.stderr
    assert "Continue that run with --resume, start over with --start-over" in refused.stderr
    assert (out / "model_final.pth").read_bytes() == first_final and (out / "metrics.json").read_text() == first_metrics
    run_tool("train_net.py", "--start-over", *run)
    kept = out / "earlier_run_1"
    assert (kept / "model_final.pth").read_bytes() == first_final
    assert (kept / "metrics.json").read_text() == first_metrics
    assert [line["iteration"] for line in read_metrics(out)] == [9, 19]  # the new run's own lines, once each


def test_a_resumed_run_keeps_the_earlier_config_yaml_and_saves_its_changed_config_beside_it(tmp_path):
    from tests.tools.cli import SHORT_RUN

    out = tmp_path / "run"
    run_tool("train_net.py", "--config-file", CONFIG, *SHORT_RUN, "SOLVER.MAX_ITER", "20", "OUTPUT_DIR", str(out))
    first = (out / "config.yaml").read_text()
    resumed = run_tool("train_net.py", "--config-file", CONFIG, "--resume", *SHORT_RUN, "SOLVER.MAX_ITER", "30",
                       "OUTPUT_DIR", str(out))
    assert (out / "config.yaml").read_text() == first
    assert "MAX_ITER: 20" in first and "MAX_ITER: 30" in (out / "config.resume_1.yaml").read_text()
    assert "Resuming with a changed config: SOLVER.MAX_ITER: 20 -> 30" in resumed.stdout + resumed.stderr


def test_processes_that_never_meet_fail_after_dist_timeout_s_naming_the_url(tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    start = time.monotonic()
    # Machine 0 of 2: machine 1 never comes.
    proc = run_tool("train_net.py", "--config-file", CONFIG, "--num-machines", "2", "--machine-rank", "0",
                    "--dist-url", url, "DIST.TIMEOUT_S", "5", "OUTPUT_DIR", str(tmp_path), expect_success=False)
    assert proc.returncode != 0
    assert f"Process 0 of 2 could not meet the others at {url} within 0:00:05" in proc.stderr
    assert "The wait is DIST.TIMEOUT_S in the config." in proc.stderr
    assert time.monotonic() - start < 120

"""Reliability round two: real tools/train_net.py runs SIGKILLed at scripted moments of a save, then resumed.

Whatever the moment, the resumed run ends as the uninterrupted one (the 60-iteration run of the ``tool_runs``
fixture): the same checkpoint files, the same final weights, and every metrics line exactly once.
"""
import os
import subprocess
import sys

import pytest
import torch

from tests.engine.digits_runs import MEASUREMENTS
from tests.tools.cli import CONFIG, REPO, SHORT_RUN, read_metrics, run_tool
from trainkit.checkpoint.serialization import load_checkpoint_file

TIMINGS = MEASUREMENTS  # what a run measures (wall times, memory) differs from run to run


def _without_timings(metrics):
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in metrics]


def _tensorboard(folder, tag):
    # Every event file of the folder, as TensorBoard reads it (the steps a resumed run purged are dropped).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.parametrize(
    "moment, file",
    [
        ("before_save", "model_final.pth"),
        ("inside_save", "model_final.pth"),
        ("after_save", "model_final.pth"),
        ("after_tag", "model_final.pth"),
        ("inside_save", "model_0000039.pth"),
        ("after_tag", "model_0000039.pth"),
    ],
)
def test_a_run_killed_at_a_save_resumes_to_the_uninterrupted_end(tmp_path, tool_runs, moment, file):
    straight = tool_runs["train_net.py"].after_60
    out = tmp_path / "run"
    args = ["--config-file", CONFIG, *SHORT_RUN, "SOLVER.MAX_ITER", "60", "OUTPUT_DIR", str(out)]
    killed = subprocess.run([sys.executable, "tests/tools/kill_at.py", moment, file, *args], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_tool("train_net.py", "--resume", *args)
    assert _without_timings(read_metrics(out)) == _without_timings(read_metrics(straight))
    for tag in ("total_loss", "lr", "classification/top1"):  # TensorBoard alike: each point once
        assert _tensorboard(out, tag) == _tensorboard(straight, tag), tag
    assert sorted(p.name for p in out.glob("*.pth")) == sorted(p.name for p in straight.glob("*.pth"))
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    ours, theirs = (load_checkpoint_file(str(d / "model_final.pth")) for d in (out, straight))
    assert ours["iteration"] == theirs["iteration"] == 59
    assert ours["model"].keys() == theirs["model"].keys()
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in ours["model"])


def test_thirty_sigkills_spread_over_a_run_end_as_the_uninterrupted_run(tmp_path):
    # 6,000 iterations, checkpoints every 50 and lines every 10: each attempt trains for a random 0-0.35 s and is
    # SIGKILLed wherever it is (a step, a write, a save, a tag), 30 times; then one more kill inside the final
    # save; then the run resumes to its end. (With 4,000 iterations and 0-0.5 s, the 30 attempts once reached the
    # end of the run before their last kill: the margin must not depend on the machine's speed this much.)
    import random
    import signal
    import time

    args = ["--config-file", CONFIG, "SOLVER.MAX_ITER", "6000", "SOLVER.LOG_PERIOD", "10",
            "SOLVER.CHECKPOINT_PERIOD", "50", "TEST.EVAL_PERIOD", "500", "SOLVER.WARMUP_ITERS", "10",
            "DATALOADER.NUM_WORKERS", "0"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    run_tool("train_net.py", *args, "OUTPUT_DIR", str(straight))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rng = random.Random(0)
    kills, finished = 0, False
    for attempt in range(60):
        if kills == 30 or finished:
            break
        log = tmp_path / f"attempt{attempt}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "tools/train_net.py", "--resume", *args, "OUTPUT_DIR", str(out)],
                                    cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "Starting training from iteration" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.35))
        proc.kill()
        proc.wait()
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
        kills += proc.returncode == -signal.SIGKILL
        finished = proc.returncode == 0
    assert kills == 30 and not finished, f"only {kills} kills landed before the run ended"
    # The last kill lands inside the final save; then the run resumes to its end.
    final = subprocess.run([sys.executable, "tests/tools/kill_at.py", "inside_save", "model_final.pth", "--resume", *args,
                            "OUTPUT_DIR", str(out)], cwd=REPO, env=env, capture_output=True, timeout=300)
    assert final.returncode == -signal.SIGKILL, final.stderr[-3000:]
    assert not (out / "model_final.pth").exists()
    run_tool("train_net.py", "--resume", *args, "OUTPUT_DIR", str(out))
    assert _without_timings(read_metrics(out)) == _without_timings(read_metrics(straight))
    ours, theirs = (load_checkpoint_file(str(d / "model_final.pth")) for d in (out, straight))
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in ours["model"])


def test_twenty_sigkills_inside_async_saves_resume_to_the_uninterrupted_end(tmp_path):
    # Async saves (SOLVER.CHECKPOINT_ASYNC): attempt k resumes and is SIGKILLed while saving the k-th periodic
    # checkpoint, at a moment drawn from: the start of the save, the snapshot, the background write, between
    # the rename and the tag, after the tag (four times each, shuffled); then once more inside the final
    # save. Each attempt is a train_net.py forked from kill_at.py (torch imported once). Then the run resumes
    # to its end and must equal the uninterrupted synchronous run.
    import json
    import random
    import signal

    args = ["--config-file", CONFIG, "SOLVER.MAX_ITER", "440", "SOLVER.LOG_PERIOD", "10",
            "SOLVER.CHECKPOINT_PERIOD", "20", "TEST.EVAL_PERIOD", "0", "SOLVER.WARMUP_ITERS", "10",
            "DATALOADER.NUM_WORKERS", "0"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    run_tool("train_net.py", *args, "OUTPUT_DIR", str(straight))
    moments = ["before_save", "inside_snapshot", "inside_save", "after_save", "after_tag"] * 4
    random.Random(15).shuffle(moments)
    plan = [f"{m}:model_{20 * k + 19:07d}.pth" for k, m in enumerate(moments)] + ["inside_save:model_final.pth"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "tests/tools/kill_at.py", "--each", ",".join(plan), "--resume",
                             *args, "SOLVER.CHECKPOINT_ASYNC", "True", "OUTPUT_DIR", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    runs = [json.loads(line) for line in killed.stdout.splitlines() if line.startswith('{"pair"')]
    assert [r["pair"] for r in runs] == plan, killed.stderr[-3000:]
    assert all(r["signal"] == signal.SIGKILL for r in runs), (runs, killed.stderr[-3000:])
    # After each kill the tag names a complete, loadable checkpoint: the newest one whose tag was written.
    for k, (moment, r) in enumerate(zip(moments, runs)):
        newest = 20 * k + 19 if moment == "after_tag" else None
        assert r["iteration"] is not None or k == 0, r
        if newest is not None:
            assert r["iteration"] == newest, r
    assert not (out / "model_final.pth").exists()
    run_tool("train_net.py", "--resume", *args, "SOLVER.CHECKPOINT_ASYNC", "True", "OUTPUT_DIR", str(out))
    lines = read_metrics(out)
    assert len({m["iteration"] for m in lines}) == len(lines)
    assert _without_timings(lines) == _without_timings(read_metrics(straight))
    ours, theirs = (load_checkpoint_file(str(d / "model_final.pth")) for d in (out, straight))
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])

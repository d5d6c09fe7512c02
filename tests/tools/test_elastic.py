"""Runs that survive a dead worker: real torchrun, real tools/train_net.py workers, real SIGKILLs.

Each test finds its workers through an environment variable of its own (torchrun starts every worker in a
session of its own, so a process group kill would miss them) and SIGKILLs whatever is left at its end.
"""
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from tests.tools.cli import CONFIG, REPO, read_metrics
from tests.tools.test_kills import _tensorboard, _without_timings
from trainkit.checkpoint.serialization import load_checkpoint_file

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers through /proc")

ARGS = ["--config-file", CONFIG, "SOLVER.MAX_ITER", "300", "SOLVER.LOG_PERIOD", "10", "SOLVER.CHECKPOINT_PERIOD",
        "20", "TEST.EVAL_PERIOD", "0", "SOLVER.WARMUP_ITERS", "10", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.CHECKPOINT_ASYNC", "True", "DIST.TIMEOUT_S", "60"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _workers(marker: str) -> Dict[int, Dict[str, str]]:
    """``{pid: environment}`` of the live processes started with ``TRAINKIT_TEST_MARKER=marker`` that are
    torchrun workers."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(kv.split("=", 1) for kv in f.read().decode(errors="replace").split("\0") if "=" in kv)
            with open(f"/proc/{entry}/status") as f:
                zombie = "\nState:\tZ" in f.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if env.get("TRAINKIT_TEST_MARKER") == marker and "LOCAL_RANK" in env and not zombie:
            found[int(entry)] = env
    return found


def _wait_for(condition, timeout, what, log):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s; torchrun's output:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)


def _logged_iterations(out: Path) -> List[int]:
    try:
        text = (out / "metrics.json").read_text()
    except FileNotFoundError:
        return []
    return [int(line.split('"iteration": ')[1].split(",")[0].rstrip("}")) for line in text.splitlines()
            if '"iteration": ' in line and line.endswith("}")]


class Torchrun:
    """``torchrun --nproc-per-node 2 tools/train_net.py ...`` with its output in a file; kills all it started."""

    def __init__(self, tmp_path: Path, name: str, max_restarts: int, *args: str) -> None:
        self.marker, self.log = f"{name}-{uuid.uuid4().hex}", tmp_path / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(TRAINKIT_TEST_MARKER=self.marker, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--max-restarts", str(max_restarts), "--master-port", str(_free_port()), "--monitor-interval", "0.2",
               "tools/train_net.py", *args]
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def worker(self, rank: int, restart: int) -> int:
        """The pid of the worker of ``rank`` in the group of restart number ``restart`` (waits for it)."""
        found: List[int] = []

        def started() -> bool:
            found[:] = [pid for pid, env in _workers(self.marker).items()
                        if env["RANK"] == str(rank) and env.get("TORCHELASTIC_RESTART_COUNT") == str(restart)]
            return bool(found)

        _wait_for(started, 120, f"no worker of rank {rank} (restart {restart}) started", self.log)
        return found[0]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun did not end within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill_all(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in _workers(self.marker):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def torchrun(tmp_path):
    runs: List[Torchrun] = []

    def start(name: str, max_restarts: int, *args: str) -> Torchrun:
        runs.append(Torchrun(tmp_path, name, max_restarts, *args))
        return runs[-1]

    yield start
    for run in runs:
        run.kill_all()


def test_torchrun_restarts_killed_workers_and_ends_bit_exact(tmp_path, torchrun):
    # The uninterrupted 2-process run, then one whose rank 1 and then (after the restart) rank 0 are SIGKILLed
    # at random iterations, with async saves, each resumed by torchrun (--max-restarts) through --resume.
    straight, out = tmp_path / "straight", tmp_path / "run"
    reference = torchrun("straight", 0, *ARGS, "OUTPUT_DIR", str(straight))
    assert reference.wait(240) == 0, reference.log.read_text()[-3000:]
    rng = random.Random(15)
    run = torchrun("elastic", 3, "--resume", *ARGS, "OUTPUT_DIR", str(out))
    target = 0
    for restart, rank in enumerate((1, 0)):
        pid = run.worker(rank, restart)
        target += rng.randrange(30, 120)  # past the lines that the killed group wrote
        _wait_for(lambda: max(_logged_iterations(out), default=-1) >= target or run.proc.poll() is not None,
                  120, f"the run did not reach iteration {target}", run.log)
        assert run.proc.poll() is None, f"the run ended before the kill:\n{run.log.read_text()[-3000:]}"
        os.kill(pid, signal.SIGKILL)
    assert run.wait(240) == 0, run.log.read_text()[-3000:]
    log = run.log.read_text()
    resumed = [line for line in log.splitlines()
               if "Resuming from iteration" in line or "starting from scratch" in line]
    assert len(resumed) == 3 and "Resuming" in resumed[1] and "Resuming" in resumed[2], resumed
    assert _without_timings(read_metrics(out)) == _without_timings(read_metrics(straight))
    for tag in ("total_loss", "lr"):
        assert _tensorboard(out, tag) == _tensorboard(straight, tag), tag
    ours, theirs = (load_checkpoint_file(str(d / "model_final.pth")) for d in (out, straight))
    assert ours["iteration"] == theirs["iteration"] == 299
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])
    assert not _workers(run.marker)


def test_without_restarts_left_torchrun_fails_naming_the_dead_rank_and_nothing_hangs(tmp_path, torchrun):
    out = tmp_path / "run"
    run = torchrun("no-restart", 0, "--resume", *ARGS, "SOLVER.MAX_ITER", "100000", "OUTPUT_DIR", str(out))
    pid = run.worker(1, 0)
    _wait_for(lambda: max(_logged_iterations(out), default=-1) >= 30, 120, "training did not pass iteration 30",
              run.log)
    os.kill(pid, signal.SIGKILL)
    assert run.wait(120) != 0
    log = run.log.read_text()
    assert "rank      : 1" in log and "Signal 9 (SIGKILL)" in log, log[-3000:]
    _wait_for(lambda: not _workers(run.marker), 30, "workers outlived torchrun", run.log)
    # The folder holds a complete checkpoint to resume from later.
    tagged = (out / "last_checkpoint").read_text()
    assert load_checkpoint_file(str(out / tagged))["iteration"] >= 19


def test_workers_exit_when_their_torchrun_agent_is_sigkilled(tmp_path, torchrun):
    out = tmp_path / "run"
    run = torchrun("orphans", 0, "--resume", *ARGS, "SOLVER.MAX_ITER", "100000", "OUTPUT_DIR", str(out))
    pids = [run.worker(rank, 0) for rank in (0, 1)]
    _wait_for(lambda: _logged_iterations(out), 120, "training did not start", run.log)
    run.proc.kill()  # the agent only: its workers are in sessions of their own
    run.proc.wait()
    _wait_for(lambda: not set(pids) & set(_workers(run.marker)), 30, "workers outlived their agent", run.log)

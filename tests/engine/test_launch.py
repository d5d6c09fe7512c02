"""launch(): in-process for one process, spawned gloo workers on CPU, torchrun-aware, failures fail fast."""
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import List

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from trainkit.engine.launch import launch
from trainkit.utils import comm

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc"), reason="checks process liveness through /proc")


def _is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie has exited and only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _read_pids(out_dir: Path, names: List[str]) -> List[int]:
    return [int((out_dir / name).read_text()) for name in names]


def _write_identity(out_dir: str) -> None:
    """Worker: writes what this process sees of the process group to ``<out_dir>/rank<r>.json``."""
    identity = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "local_rank": comm.get_local_rank(),
        "local_size": comm.get_local_size(),
        "pid": os.getpid(),
    }
    with open(os.path.join(out_dir, f"rank{identity['rank']}.json"), "w") as f:
        json.dump(identity, f)


def _fail_on_rank_1(out_dir: str) -> None:
    """Worker: rank 1 raises while rank 0 waits in a barrier that rank 1 never reaches."""
    rank = dist.get_rank()
    with open(os.path.join(out_dir, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    if rank == 1:
        # Keeps rank 1 alive after its exception, so rank 0's consequent "connection closed" failure reaches
        # the launcher first: launch must still report rank 1's error, and must not wait for rank 1 to exit.
        import atexit

        atexit.register(time.sleep, 60)
        raise ValueError("rank 1 failed on purpose")
    dist.barrier()


def test_world_size_one_runs_in_this_process():
    seen = []

    def main(a, b):
        seen.append((a, b, os.getpid(), dist.is_initialized()))

    assert launch(main, num_gpus_per_machine=1, args=(3, "x")) is None
    assert seen == [(3, "x", os.getpid(), False)]
    assert not dist.is_initialized()


@needs_proc
def test_two_cpu_processes_get_ranks_0_and_1_of_world_size_2(tmp_path):
    launch(_write_identity, num_gpus_per_machine=2, dist_url="auto", args=(str(tmp_path),))

    identities = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    pids = [identity.pop("pid") for identity in identities]
    assert identities == [
        {"rank": 0, "world_size": 2, "backend": "gloo", "local_rank": 0, "local_size": 2},
        {"rank": 1, "world_size": 2, "backend": "gloo", "local_rank": 1, "local_size": 2},
    ]
    assert os.getpid() not in pids and pids[0] != pids[1]
    assert multiprocessing.active_children() == []
    assert [_is_running(pid) for pid in pids] == [False, False]
    assert not dist.is_initialized()


@needs_proc
def test_worker_error_fails_fast_with_that_worker_traceback_and_leaves_no_process(tmp_path):
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException) as info:
        launch(_fail_on_rank_1, num_gpus_per_machine=2, args=(str(tmp_path),))
    elapsed = time.monotonic() - start

    assert info.value.error_index == 1
    message = str(info.value)
    assert "Process 1 terminated with the following error" in message
    assert "ValueError: rank 1 failed on purpose" in message
    assert "Connection closed" not in message  # rank 0's failure is a consequence, not the cause
    assert elapsed < 30, f"launch took {elapsed:.1f} s to report the failure"
    assert multiprocessing.active_children() == []
    assert [_is_running(pid) for pid in _read_pids(tmp_path, ["pid0", "pid1"])] == [False, False]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_machines": 2, "dist_url": "auto"}, "dist_url='auto' only works with one machine"),
        ({"num_machines": 2, "dist_url": None}, "dist_url=None only works with one machine"),
        ({"num_machines": 2, "machine_rank": 2, "dist_url": "tcp://127.0.0.1:1"}, "machine_rank=2 is out of range"),
        ({"num_gpus_per_machine": 0}, "num_gpus_per_machine=0 must be at least 1"),
        ({"dist_url": "file:///nonexistent/x"}, r"dist_url='file:///nonexistent/x': the folder '/nonexistent' does not "
                                                r"exist, so the processes cannot meet there"),
        ({"dist_url": "tcp://nonexistent.invalid:29500"}, r"dist_url='tcp://nonexistent.invalid:29500': the host "
                                                          r"'nonexistent.invalid' cannot be resolved"),
    ],
)
def test_inconsistent_arguments_are_rejected_before_spawning(kwargs, match):
    kwargs = {"num_gpus_per_machine": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        launch(pytest.fail, **kwargs)
    assert multiprocessing.active_children() == []


_TORCHRUN_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from trainkit.engine.launch import launch
from trainkit.utils import comm

def main(out_dir):
    record = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "local_rank": comm.get_local_rank(),
              "local_size": comm.get_local_size(), "pid": os.getpid()}
    with open(os.path.join(out_dir, "main%d.json" % dist.get_rank()), "w") as f:
        json.dump(record, f)

if __name__ == "__main__":
    out_dir, pid_dir = sys.argv[1:]
    with open(os.path.join(pid_dir, "pid%s" % os.environ["RANK"]), "w") as f:
        f.write(str(os.getpid()))
    launch(main, num_gpus_per_machine=2, args=(out_dir,))
    after = {"initialized": dist.is_initialized(), "local_group": comm._LOCAL_PROCESS_GROUP is not None,
             "pid": os.getpid()}
    with open(os.path.join(out_dir, "after%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(after, f)
"""


def _clean_env() -> dict:
    variables = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    return {k: v for k, v in os.environ.items() if k not in variables}


def _run_torchrun(script: Path, out_dir: Path, pid_dir: Path, log: Path, timeout: float) -> int:
    """Runs ``script`` under torchrun with 2 processes; whatever happens, leaves none of its processes behind."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(script), str(out_dir), str(pid_dir)]
    with open(log, "w") as log_file:
        # Output goes to a file, not a pipe: a stuck worker holding a pipe open would block this test.
        proc = subprocess.Popen(cmd, env=_clean_env(), stdout=log_file, stderr=subprocess.STDOUT)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish within {timeout} s; its output:\n{log.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.terminate()  # torchrun stops its workers on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # torchrun starts each worker in a session of its own: stop any that outlived it, by pid.
        for pid_file in pid_dir.iterdir():
            if _is_running(int(pid_file.read_text())):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


@needs_proc
def test_under_torchrun_launch_joins_the_group_in_process_and_destroys_it(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_TORCHRUN_SCRIPT)
    out_dir, pid_dir = tmp_path / "out", tmp_path / "pids"
    out_dir.mkdir()
    pid_dir.mkdir()
    returncode = _run_torchrun(script, out_dir, pid_dir, tmp_path / "torchrun.log", timeout=90)
    assert returncode == 0, (tmp_path / "torchrun.log").read_text()[-3000:]

    # Exactly torchrun's two processes ran main (launch spawned nothing), each in the process that called
    # launch, and each left no process group behind.
    assert sorted(p.name for p in out_dir.iterdir()) == ["after0.json", "after1.json", "main0.json", "main1.json"]
    for rank in range(2):
        main = json.loads((out_dir / f"main{rank}.json").read_text())
        after = json.loads((out_dir / f"after{rank}.json").read_text())
        assert main == {"rank": rank, "world_size": 2, "local_rank": rank, "local_size": 2, "pid": after["pid"]}
        assert after == {"initialized": False, "local_group": False, "pid": main["pid"]}


_ORPHAN_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
from trainkit.engine.launch import launch

def main(out_dir):
    with open(os.path.join(out_dir, "pid%d" % dist.get_rank()), "w") as f:
        f.write(str(os.getpid()))
    dist.recv(torch.zeros(1), src=1 - dist.get_rank())  # nobody sends: blocks inside gloo

if __name__ == "__main__":
    launch(main, num_gpus_per_machine=2, args=(sys.argv[1],))
"""


@needs_proc
def test_workers_blocked_in_a_collective_die_with_a_killed_launcher(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(_ORPHAN_SCRIPT)
    # The killed launcher cannot remove its temporary folder: let it make it under tmp_path, not in /tmp.
    env = {**_clean_env(), "TMPDIR": str(tmp_path)}
    launcher = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env)
    worker_pids: List[int] = []
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / name).exists() for name in ("pid0", "pid1")):
            assert launcher.poll() is None, "the launcher exited before its workers started"
            assert time.monotonic() < deadline, "the workers did not start within 60 s"
            time.sleep(0.1)
        time.sleep(0.2)  # let both workers enter recv
        worker_pids = _read_pids(tmp_path, ["pid0", "pid1"])
        launcher.kill()
        launcher.wait()

        deadline = time.monotonic() + 10
        while any(_is_running(pid) for pid in worker_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [_is_running(pid) for pid in worker_pids] == [False, False]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in worker_pids:
            if _is_running(pid):
                os.kill(pid, signal.SIGKILL)

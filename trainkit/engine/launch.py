"""Start one training process per device and set up torch.distributed for it.

``launch(main_func, num_gpus_per_machine, ...)`` is the entry point used by ``tools/train_net.py``. It covers
three situations:

* world size 1, not under ``torchrun``: ``main_func(*args)`` runs in this process, without a process group;
* plain ``python train_net.py --num-gpus N``: N worker processes are spawned on this machine, each joins the
  process group (NCCL with one GPU per process, or gloo on a machine without CUDA) and runs ``main_func``;
* ``torchrun --nproc_per_node N train_net.py``: torchrun already started one process per device, so this
  process joins the group from torchrun's environment variables and runs ``main_func`` itself.

In every worker the process group is destroyed when ``main_func`` returns or raises. When one spawned worker
raises, the others are terminated (even when they are blocked in a collective) and ``launch`` raises
``torch.multiprocessing.ProcessRaisedException`` carrying the traceback of the worker that failed first.
"""
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainkit.utils import comm

__all__ = ["DEFAULT_TIMEOUT", "launch"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)

_TORCHRUN_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Sequence[Any] = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Runs ``main_func(*args)`` once per device, with torch.distributed initialised in each process.

    Args:
        main_func: the function every process runs. With more than one process it is pickled into spawned
            processes, so it must be defined at the top level of an importable module; so must ``args``.
        num_gpus_per_machine: processes per machine, one per GPU. On a machine without CUDA this many CPU
            processes are started with the gloo backend instead.
        num_machines: number of machines taking part.
        machine_rank: rank of this machine, in ``[0, num_machines)``.
        dist_url: URL the processes use to find each other, e.g. ``"tcp://10.0.0.1:29500"`` (the address of
            machine 0). ``"auto"`` picks a free port on localhost and is valid only with one machine; ``None``
            means ``"auto"`` with one machine and is an error with several.
        args: positional arguments for ``main_func``.
        timeout: how long the processes wait to meet (and the timeout of the process group's collectives);
            ``tools/train_net.py`` passes ``DIST.TIMEOUT_S`` of the config.

    Under ``torchrun`` (its RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT are
    set), nothing is spawned: this process joins the group through ``env://`` and runs ``main_func`` itself.

    Raises:
        ValueError: on inconsistent arguments (the message names the value and the fix).
        torch.multiprocessing.ProcessRaisedException: when a spawned worker raised; the message holds the
            traceback of the first worker that failed (not of the peers that failed because of it).
    """
    _check_sizes(num_gpus_per_machine, num_machines, machine_rank)
    if _under_torchrun():
        _run_under_torchrun(main_func, num_gpus_per_machine, num_machines, dist_url, tuple(args), timeout)
        return
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        main_func(*args)
        return
    dist_url = _resolve_dist_url(dist_url, num_machines)
    backend = _spawn_backend(num_gpus_per_machine)
    logger.info(
        "Launching %d process(es) on machine %d of %d: backend %s, world size %d, dist_url %s",
        num_gpus_per_machine, machine_rank, num_machines, backend, world_size, dist_url,
    )
    worker_args = (main_func, tuple(args), backend, dist_url, world_size, num_gpus_per_machine, machine_rank, timeout)
    _spawn_and_join(num_gpus_per_machine, worker_args)


def _check_sizes(num_gpus_per_machine: int, num_machines: int, machine_rank: int) -> None:
    if num_gpus_per_machine < 1:
        raise ValueError(f"num_gpus_per_machine={num_gpus_per_machine} must be at least 1.")
    if num_machines < 1:
        raise ValueError(f"num_machines={num_machines} must be at least 1.")
    if not 0 <= machine_rank < num_machines:
        raise ValueError(
            f"machine_rank={machine_rank} is out of range for num_machines={num_machines}; "
            f"use a value in [0, {num_machines - 1}]."
        )


def _under_torchrun() -> bool:
    return all(name in os.environ for name in _TORCHRUN_ENV_VARS)


def _resolve_dist_url(dist_url: Optional[str], num_machines: int) -> str:
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError(
                f"dist_url={dist_url!r} only works with one machine, got num_machines={num_machines}; "
                "pass the address of machine 0 on every machine, e.g. dist_url='tcp://10.0.0.1:29500'."
            )
        return f"tcp://127.0.0.1:{_find_free_port()}"
    if dist_url.startswith("file://"):
        folder = os.path.dirname(dist_url[len("file://"):])
        if not os.path.isdir(folder):
            raise ValueError(
                f"dist_url={dist_url!r}: the folder {folder!r} does not exist, so the processes cannot meet there. "
                "Give a file:// path in an existing folder (shared by every machine), or a tcp://HOST:PORT address."
            )
        if num_machines > 1:
            logger.warning("dist_url %s on %d machines requires a file system that all of them share.", dist_url,
                           num_machines)
    elif dist_url.startswith("tcp://"):
        host = dist_url[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
        try:
            socket.getaddrinfo(host, None)
        except socket.gaierror as e:
            raise ValueError(
                f"dist_url={dist_url!r}: the host {host!r} cannot be resolved ({e.strerror}). Give the address of "
                "machine 0 that every machine can reach, e.g. tcp://10.0.0.1:29500."
            ) from None
    return dist_url


def _find_free_port() -> int:
    # The port is released before the workers bind it; another program could take it in between, which is
    # unlikely enough on a developer machine and is what "auto" trades for convenience.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn_backend(num_procs: int) -> str:
    if torch.cuda.is_available():
        if num_procs > torch.cuda.device_count():
            raise ValueError(
                f"num_gpus_per_machine={num_procs} but this machine has {torch.cuda.device_count()} CUDA "
                "device(s); ask for at most that many."
            )
        return "nccl"
    logger.info(
        "CUDA is not available: starting %d CPU process(es) with the gloo backend "
        "(num_gpus_per_machine counts processes per machine).", num_procs,
    )
    return "gloo"


def _setup_device(local_rank: int) -> str:
    """Binds this process to its GPU and returns the backend to use."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return "nccl"
    return "gloo"


def _run_under_torchrun(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int,
    dist_url: Optional[str],
    args: Tuple[Any, ...],
    timeout: timedelta,
) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world_size = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    if rank == 0 and world_size != num_machines * num_gpus_per_machine:
        logger.warning(
            "torchrun started %d process(es) (%d per machine) but launch() was asked for %d machine(s) x %d; "
            "following torchrun.", world_size, local_world_size, num_machines, num_gpus_per_machine,
        )
    if rank == 0 and dist_url not in (None, "auto", "env://"):
        logger.warning("Ignoring dist_url=%s: under torchrun the group is set up from MASTER_ADDR/MASTER_PORT.",
                       dist_url)
    backend = _setup_device(local_rank)
    if rank == 0:
        logger.info("Running under torchrun: backend %s, world size %d, dist_url env://%s:%s", backend,
                    world_size, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    # torchrun names the machine in GROUP_RANK; without it, assume its usual contiguous blocks of ranks.
    machine_id = int(os.environ.get("GROUP_RANK", rank // local_world_size))
    _exit_when_launcher_dies(os.getppid())
    # torchrun keeps one TCPStore for all restarts of a worker group, and the process group writes the same
    # keys in it each time (``default_pg/0//cpu/rank_0``, ...): a restarted group would read the dead group's
    # addresses ("Gloo connectFullMesh failed ... Connection refused") or wait for its counters until the
    # timeout. A prefix per restart scopes them.
    prefix = f"trainkit/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    _run_in_process_group(main_func, args, backend, "env://", world_size, rank, machine_id, timeout,
                          store_prefix=prefix)


def _exit_when_launcher_dies(launcher_pid: int, poll_s: float = 1.0) -> None:
    # A torchrun worker whose agent is SIGKILLed is re-parented and, blocked in a collective, waits forever
    # (or trains on alone). torchrun sets no parent-death signal; this thread notices the new parent within a
    # second and SIGKILLs the worker, wherever its main thread is (checkpoints are atomic: nothing is torn).
    def watch() -> None:
        while os.getppid() == launcher_pid:
            time.sleep(poll_s)
        logger.error("The launcher (pid %d) of this worker is gone: exiting.", launcher_pid)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="trainkit-launcher-watchdog", daemon=True).start()


def _spawn_and_join(num_procs: int, worker_args: Tuple[Any, ...]) -> None:
    failure_dir = tempfile.mkdtemp(prefix="trainkit-launch-")
    context = None
    try:
        context = mp.start_processes(
            _distributed_worker, args=worker_args + (failure_dir,), nprocs=num_procs, join=False, daemon=False,
            start_method="spawn",
        )
        try:
            # join() returns False while workers are running; on the first failure it terminates the others
            # and raises.
            while not context.join():
                pass
        except mp.ProcessRaisedException as exc:
            root = _first_failure(failure_dir, context.pids())
            if root is None or root.error_index == exc.error_index:
                raise
            raise root from None
    finally:
        shutil.rmtree(failure_dir, ignore_errors=True)
        for path in context.error_files if context is not None else []:
            if os.path.exists(path):
                os.remove(path)


def _distributed_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    args: Tuple[Any, ...],
    backend: str,
    dist_url: str,
    world_size: int,
    num_procs_per_machine: int,
    machine_rank: int,
    timeout: timedelta,
    failure_dir: str,
) -> None:
    _die_with_parent()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    rank = machine_rank * num_procs_per_machine + local_rank
    failure_file = os.path.join(failure_dir, f"{local_rank}.json")
    _run_in_process_group(main_func, args, backend, dist_url, world_size, rank, machine_rank, timeout, failure_file)


def _run_in_process_group(
    main_func: Callable[..., Any],
    args: Tuple[Any, ...],
    backend: str,
    init_method: str,
    world_size: int,
    rank: int,
    machine_id: int,
    timeout: timedelta,
    failure_file: Optional[str] = None,
    store_prefix: Optional[str] = None,
) -> None:
    """Joins the process group, runs ``main_func`` and always leaves the group again. With ``store_prefix``, the
    group's keys in the store of ``init_method`` are written under that prefix."""
    try:
        store = None
        if store_prefix is not None:
            shared, _, _ = next(dist.rendezvous(init_method, rank, world_size, timeout=timeout))
            store = dist.PrefixStore(store_prefix, shared)
        dist.init_process_group(backend=backend, init_method=None if store else init_method, store=store,
                                world_size=world_size, rank=rank, timeout=timeout)
    except Exception as e:
        raise RuntimeError(
            f"Process {rank} of {world_size} could not meet the others at {init_method} within {timeout} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check that every machine runs with "
            "the same --dist-url and --num-machines, that machine 0's address and port are reachable from every "
            "machine, and that each --machine-rank is given once. The wait is DIST.TIMEOUT_S in the config."
        ) from e
    try:
        _create_local_process_group(machine_id)
        comm.synchronize()
        main_func(*args)
    except Exception as e:
        if isinstance(e, dist.DistError) or "gloo" in str(e).lower():
            logger.error(
                "Process %d of %d: a collective failed (%s). Another process probably died or stopped answering; "
                "a silent peer is waited for DIST.TIMEOUT_S (%s) before this error.", rank, world_size,
                str(e).splitlines()[0] if str(e) else type(e).__name__, timeout,
            )
        # Recorded before the group is destroyed below: destroying it is what makes the peers fail, so this
        # timestamp tells the root cause from its consequences.
        if failure_file is not None:
            _record_failure(failure_file)
        raise
    finally:
        comm._LOCAL_PROCESS_GROUP = None
        comm._LOCAL_SIZE = None
        dist.destroy_process_group()


def _create_local_process_group(machine_id: int) -> None:
    """Creates the group of the processes on this machine and stores it in ``comm``."""
    machine_ids: List[Optional[int]] = [None] * dist.get_world_size()
    dist.all_gather_object(machine_ids, machine_id)
    ranks_per_machine = [
        [rank for rank, other in enumerate(machine_ids) if other == machine] for machine in sorted(set(machine_ids))
    ]
    # Every rank creates every machine's group, in the same order, as new_group requires.
    local_group, _ = dist.new_subgroups_by_enumeration(ranks_per_machine)
    comm._LOCAL_PROCESS_GROUP = local_group
    comm._LOCAL_SIZE = dist.get_world_size(local_group)


def _die_with_parent() -> None:
    # torch asks the kernel to send SIGINT to a spawned worker whose parent dies, but a worker blocked inside a
    # collective never gets back to Python to handle it. SIGKILL ends it wherever it is (SIGTERM would not:
    # trainkit's PreemptionHandler installs a Python handler for it).
    set_pdeathsig = getattr(mp, "_prctl_pr_set_pdeathsig", None)
    if set_pdeathsig is not None:
        set_pdeathsig(signal.SIGKILL)


def _record_failure(path: str) -> None:
    record = {"time_ns": time.time_ns(), "traceback": traceback.format_exc()}
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def _first_failure(failure_dir: str, pids: List[int]) -> Optional[mp.ProcessRaisedException]:
    """The exception of the worker whose ``main_func`` raised first, or None when none was recorded."""
    records = []
    for name in os.listdir(failure_dir):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(failure_dir, name)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue  # a worker terminated while it was writing its record
        records.append((record["time_ns"], int(name[: -len(".json")]), record["traceback"]))
    if not records:
        return None
    _, index, trace = min(records)
    msg = f"\n\n-- Process {index:d} terminated with the following error:\n{trace}"
    return mp.ProcessRaisedException(msg, index, pids[index])

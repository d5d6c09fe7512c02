"""How many CPU instructions does trainkit's loop add to a step? A noise-free companion to overhead.py.

Wall-clock ratios move by +-1% from run to run on a shared machine. This script counts instructions instead,
under valgrind's cachegrind (a simulated CPU: the counts are the same on every run and every machine with the
same software). Each variant of ``overhead.py`` (the hand-written loop and trainkit, bare and with hooks, on a
workload) runs in its own process twice, for ``N1`` and ``N2`` iterations; the difference divided by
``N2 - N1`` is the instructions per iteration, free of imports and set-up.

``--cache-sim`` also simulates the first-level caches and reports their misses per iteration: a step's
Python work costs more time than its instruction count suggests because it misses these caches (see
benchmarks/README.md).

Usage: ``python benchmarks/instructions.py [--workload tiny] [--iters 500,2500] [--cache-sim] [--jobs 2]``

Needs ``valgrind`` on the PATH (``apt-get install valgrind``); about 5 minutes on 2 cores, 11 with
``--cache-sim`` (valgrind runs ``import torch`` about 50 times slower than the CPU).
"""
import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Tuple

VARIANTS = ("hand-bare", "trainkit-bare", "hand-hooks", "trainkit-hooks")
# cachegrind's event names: instructions, first-level instruction cache misses, first-level data read and
# write misses.
EVENTS = {"Ir": "instructions", "I1mr": "L1i misses", "D1mr": "L1d read misses", "D1mw": "L1d write misses"}


def run_child(variant: str, workload: str, iters: int) -> None:
    """Runs one variant once (inside valgrind): builds the workload, trains ``iters`` iterations."""
    import torch

    from overhead import hand_loop, make_workload, trainkit_loop

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    model, data, opt, sched = make_workload(workload)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "metrics.json")
        who, extras = variant.split("-")
        loop = hand_loop if who == "hand" else trainkit_loop
        loop(model, data, opt, sched, iters, extras == "hooks", path)


def read_summary(path: str) -> Dict[str, int]:
    """The totals of a cachegrind output file: ``{event name: count}``."""
    events: List[str] = []
    with open(path) as f:
        for line in f:
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith("summary:"):
                return dict(zip(events, map(int, line.split()[1:])))
    raise RuntimeError(f"{path} has no 'summary:' line; did valgrind finish? Run it by hand to see its error.")


def count(variant: str, workload: str, iters: int, cache_sim: bool, tmp: str) -> Dict[str, int]:
    out = os.path.join(tmp, f"{variant}.{iters}.cg")
    cmd = [
        "valgrind", "--tool=cachegrind", f"--cache-sim={'yes' if cache_sim else 'no'}",
        f"--cachegrind-out-file={out}", sys.executable, os.path.abspath(__file__),
        "--child", variant, "--workload", workload, "--iters", str(iters),
    ]
    # Repeatable counts: one thread everywhere (an idle BLAS worker spinning under valgrind adds instructions
    # in proportion to the run's length) and a fixed string hash (dict probing depends on it).
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit status {done.returncode}:\n{done.stderr[-3000:]}")
    return read_summary(out)


def per_iteration(low: Dict[str, int], high: Dict[str, int], n: int) -> Dict[str, float]:
    """Events per iteration from the totals of two runs that differ by ``n`` iterations."""
    return {k: (high[k] - low[k]) / n for k in high}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="tiny", choices=["tiny", "mlp"])
    parser.add_argument("--iters", default="500,2500", help="N1,N2: the two runs' iteration counts")
    parser.add_argument("--cache-sim", action="store_true", help="also count simulated L1 cache misses")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="valgrind processes at once")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.workload, int(args.iters))
        return
    n1, n2 = (int(x) for x in args.iters.split(","))
    if n2 <= n1:
        parser.error(f"--iters N1,N2 needs N2 > N1, got {args.iters}")
    if shutil.which("valgrind") is None:
        sys.exit("instructions.py needs valgrind on the PATH (apt-get install valgrind); overhead.py needs nothing.")

    runs: List[Tuple[str, int]] = [(v, n) for v in VARIANTS for n in (n1, n2)]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        totals = dict(zip(runs, pool.map(lambda r: count(r[0], args.workload, r[1], args.cache_sim, tmp), runs)))
    per_it = {v: per_iteration(totals[(v, n1)], totals[(v, n2)], n2 - n1) for v in VARIANTS}

    events = [e for e in EVENTS if e in per_it[VARIANTS[0]]]
    print(f"workload {args.workload}: {EVENTS['Ir']} per iteration (runs of {n1} and {n2} iterations under cachegrind)")
    print(f"{'variant':<7} {'event':<17} {'hand-written':>13} {'trainkit':>11} {'extra':>9} {'ratio':>7}")
    for extras in ("bare", "hooks"):
        for e in events:
            hand, tk = per_it[f"hand-{extras}"][e], per_it[f"trainkit-{extras}"][e]
            print(f"{extras:<7} {EVENTS[e]:<17} {hand:>13,.0f} {tk:>11,.0f} {tk - hand:>9,.0f} {tk / hand:>7.3f}")


if __name__ == "__main__":
    main()

"""What does torch.compile (``MODEL.COMPILE``) buy per training step on the CPU?

For each workload of ``overhead.py`` ("tiny": ``Linear(32, 32)``, batch 8; "mlp": 784-512-512-10, batch 64),
builds the model twice from the same seed: eager, and compiled in place the way DefaultTrainer does it
(:func:`trainkit.engine.compile.compile_model`, inductor). The compiled one's first steps compile (their time
is reported apart, as "compile s"). Then each repeat trains both with a bare ``SimpleTrainer`` for
``--iters`` iterations, back to back and in alternating order, so that machine noise hits them alike; the
medians over repeats are printed with the ratio compiled / eager (below 1: compiled is faster).

Usage: ``python benchmarks/compile.py [--iters 500] [--repeats 7] [--threads 1] [--mode default]``
"""
import argparse
import gc
import logging
import statistics
import time
from typing import Dict, List

import torch

from overhead import make_workload
from trainkit.engine import SimpleTrainer
from trainkit.engine.compile import compile_model


def train_for(model, data, opt, iters: int) -> float:
    trainer = SimpleTrainer(model, data, opt)
    start = time.perf_counter()
    trainer.train(0, iters)
    return time.perf_counter() - start


def measure(workload: str, iters: int, repeats: int, mode: str, backend: str) -> Dict[str, float]:
    """Eager (0) against compiled (1), interleaved, in the same process."""
    eager = make_workload(workload)
    compiled = make_workload(workload)
    compile_model(compiled[0], mode=mode, backend=backend)
    compile_s = train_for(compiled[0], compiled[1], compiled[2], 3)  # traces and compiles forward and backward
    variants = [eager, compiled]
    times: List[List[float]] = [[], []]
    ratios: List[float] = []
    for r in range(repeats + 1):  # repeat 0 warms up both and is not counted
        order = [0, 1] if r % 2 == 0 else [1, 0]
        took = [0.0, 0.0]
        for which in order:
            model, data, opt, _ = variants[which]
            gc.collect()
            took[which] = train_for(model, data, opt, iters)
        if r > 0:
            times[0].append(took[0])
            times[1].append(took[1])
            ratios.append(took[1] / took[0])
    return {
        "compile_s": compile_s,
        "eager_us_per_iter": statistics.median(times[0]) / iters * 1e6,
        "compiled_us_per_iter": statistics.median(times[1]) / iters * 1e6,
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noise)")
    parser.add_argument("--mode", default="default", help="torch.compile mode (MODEL.COMPILE_MODE)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (MODEL.COMPILE_BACKEND)")
    parser.add_argument("--workloads", default="tiny,mlp")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.iters} iterations x {args.repeats} repeats, "
          f"mode {args.mode!r}, backend {args.backend!r}")
    print(f"{'workload':<8} {'compile s':>9} {'eager us/it':>12} {'compiled us/it':>15} {'ratio':>7} {'range':>13}")
    for workload in args.workloads.split(","):
        r = measure(workload, args.iters, args.repeats, args.mode, args.backend)
        print(f"{workload:<8} {r['compile_s']:>9.1f} {r['eager_us_per_iter']:>12.1f} "
              f"{r['compiled_us_per_iter']:>15.1f} {r['ratio']:>7.3f} {r['ratio_min']:>6.3f}-{r['ratio_max']:.3f}")


if __name__ == "__main__":
    main()

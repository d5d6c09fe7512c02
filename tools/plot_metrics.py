#!/usr/bin/env python
"""Plot metrics from one or more runs' metrics.json into a PNG.

    python tools/plot_metrics.py output/digits_mlp        # writes output/digits_mlp/metrics.png
    python tools/plot_metrics.py output/run_a output/run_b -k total_loss classification/top1 -o compare.png

Each run is a folder holding metrics.json (or the file itself). One panel per metric, one line per run, so
several runs compare in one figure. The PNG goes into the first run's folder unless -o says otherwise.
Needs matplotlib (`pip install trainkit[examples]`). For live curves use TensorBoard: `tensorboard --logdir output`.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple


def read_metrics(path: str) -> List[dict]:
    """The lines of a metrics.json (a folder or the file), skipping any line that does not parse."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No metrics file at {path!r}: pass a run's OUTPUT_DIR or its metrics.json.")
    lines = []
    with open(path) as f:
        for line in f:
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def series(lines: Sequence[dict], key: str) -> Tuple[List[int], List[float]]:
    """(iterations, values) of ``key`` over the lines that have it."""
    points = [(m["iteration"], m[key]) for m in lines if key in m and "iteration" in m]
    return [p[0] for p in points], [p[1] for p in points]


def default_keys(lines: Sequence[dict]) -> List[str]:
    keys = {k for m in lines for k in m}
    evals = sorted(k for k in keys if "/" in k)
    return [k for k in ("total_loss", "lr") if k in keys] + evals


def plot(runs: Dict[str, List[dict]], keys: Sequence[str], output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.6 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for name, lines in runs.items():
            xs, ys = series(lines, key)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=name)
        ax.set_ylabel(key)
        if key.endswith("loss"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    axes[-1, 0].set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)


def _run_folder(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Plot metrics.json of one or more runs into a PNG.")
    parser.add_argument("runs", nargs="+", help="run folders (OUTPUT_DIR) or metrics.json files")
    parser.add_argument("-k", "--keys", nargs="+", help="metrics to plot (default: total_loss, lr, eval metrics)")
    parser.add_argument("-o", "--output", help="PNG file to write (default: metrics.png in the first run's folder)")
    args = parser.parse_args(argv)
    runs = {path.rstrip("/"): read_metrics(path) for path in args.runs}
    keys = args.keys or default_keys([m for lines in runs.values() for m in lines])
    missing = [k for k in keys if not any(series(lines, k)[0] for lines in runs.values())]
    if missing:
        known = sorted({k for lines in runs.values() for m in lines for k in m} - {"iteration"})
        print(f"error: no run has {missing}; available: {known}", file=sys.stderr)
        return 2
    output = args.output or os.path.join(_run_folder(args.runs[0]), "metrics.png")
    plot(runs, keys, output)
    print(f"wrote {output} ({len(keys)} panels, {len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())

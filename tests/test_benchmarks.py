"""The benchmark script runs end to end (a few iterations; its timings are never asserted here)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_benchmark_prints_a_ratio_for_every_workload_and_variant():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--iters", "25", "--repeats", "1",
         "--skip-memory", "--loss-paths"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    rows = {tuple(line.split()[:2]): line.split() for line in out.splitlines() if line.startswith(("tiny", "mlp"))}
    for key in [("tiny", "bare"), ("tiny", "hooks"), ("mlp", "bare"), ("mlp", "hooks")]:
        hand, trainkit, ratio = map(float, rows[key][2:5])
        # One repeat: the printed ratio is that of the two printed times.
        assert hand > 0 and trainkit > 0 and abs(ratio - trainkit / hand) < 0.01
    loss_paths = [row for row in map(str.split, out.splitlines()) if row[:1] in (["tiny"], ["mlp"]) and len(row) == 4]
    assert [row[0] for row in loss_paths] == ["tiny", "mlp"]

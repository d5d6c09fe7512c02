"""The benchmark scripts run end to end (a few iterations; their timings are never asserted here)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_benchmark_prints_a_ratio_for_every_workload_and_variant():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--iters", "25", "--repeats", "1",
         "--skip-memory"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    rows = {tuple(line.split()[:2]): line.split() for line in out.splitlines() if line.startswith(("tiny", "mlp"))}
    for key in [("tiny", "bare"), ("tiny", "hooks"), ("mlp", "bare"), ("mlp", "hooks")]:
        hand, trainkit, ratio = map(float, rows[key][2:5])
        # One repeat: the printed ratio is that of the two printed times.
        assert hand > 0 and trainkit > 0 and abs(ratio - trainkit / hand) < 0.01


def test_compile_benchmark_prints_eager_and_compiled_step_times():
    # aot_eager traces and partitions the model as inductor does but generates no code: seconds, not minutes.
    # (tests/engine/test_compile.py compiles with inductor itself.)
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compile.py"), "--iters", "5", "--repeats", "1",
         "--backend", "aot_eager", "--workloads", "tiny"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny")]
    assert len(rows) == 1
    compile_s, eager, compiled, ratio = map(float, rows[0][1:5])
    assert compile_s > 0 and eager > 0 and compiled > 0 and abs(ratio - compiled / eager) < 0.01


def test_instruction_counter_children_train_the_hand_written_and_trainkit_loops():
    # instructions.py runs each variant in a child process under valgrind; here the children run without it.
    for variant in ("hand-hooks", "trainkit-hooks"):
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "instructions.py"), "--child", variant, "--iters", "5"],
            capture_output=True, text=True, timeout=120, check=True,
        )


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_instruction_counts_per_iteration_come_from_the_difference_of_two_runs(tmp_path):
    # The method of instructions.py on a loop whose cost is known to be small: start-up (the interpreter's
    # millions of instructions) cancels out, and what is left is per iteration.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import instructions
    finally:
        sys.path.pop(0)
    totals = []
    for n in (1000, 21000):
        out = tmp_path / f"{n}.cg"
        subprocess.run(
            ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}", sys.executable,
             "-S", "-c", f"for i in range({n}): pass"],
            capture_output=True, timeout=120, check=True,
        )
        totals.append(instructions.read_summary(str(out)))
    assert totals[0]["Ir"] > 1_000_000  # the interpreter's start-up
    per_iter = instructions.per_iteration(totals[0], totals[1], 20000)["Ir"]
    assert 5 < per_iter < 500  # one FOR_ITER and one STORE_NAME per iteration


def test_checkpoint_benchmark_times_sync_and_async_saves_and_cleans_up(tmp_path):
    result = tmp_path / "result.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "checkpoint.py"), "--repeats", "1", "--width", "128",
         "--dir", str(tmp_path), "--json", str(result)],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "async stall / sync save" in out and "async stall / bare copy" in out
    import json

    data = json.loads(result.read_text())
    assert len(data["rows"]) == 1 and data["first"]["sync_s"] > 0 and data["first"]["async_write_s"] > 0
    assert abs(data["stall_vs_sync"] - data["rows"][0]["async_stall_s"] / data["rows"][0]["sync_s"]) < 1e-9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # the checkpoint folder is gone


def test_fsdp_memory_benchmark_prints_both_variants_for_both_ranks_and_their_ratio():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fsdp_memory.py"), "--blocks", "2", "--width", "256",
         "--iters", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith(("ddp ", "fsdp "))]
    assert [(r[0], r[1]) for r in rows] == [("ddp", "0"), ("ddp", "1"), ("fsdp", "0"), ("fsdp", "1")]
    held = {r[0]: float(r[3]) for r in rows}
    assert held["fsdp"] < held["ddp"]  # the shard is what an FSDP process holds by design
    assert "ratio fsdp/ddp (largest rank): " in out


def test_writers_benchmark_prints_a_ratio_for_every_writer():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "writers.py"), "--repeats", "1", "--period", "2", "--names", "3"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith(("json", "csv", "mlflow"))]
    assert [r[0] for r in rows] == ["json", "csv", "mlflow", "mlflow"]
    for row in rows:
        hand, trainkit, ratio = map(float, row[-3:])
        assert hand > 0 and trainkit > 0 and abs(ratio - trainkit / hand) < 0.02 * ratio  # times printed to 0.1 us

"""The scripts of examples/ run as a user runs them, and do what they say."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_spirals_example_trains_its_own_model_and_evaluates_with_its_own_evaluator(tmp_path):
    script = REPO / "examples" / "train_spirals.py"
    assert len(script.read_text().splitlines()) < 80
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script),
                           "OUTPUT_DIR", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert results["spirals"]["accuracy"] > 85  # chance is 50
    lines = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    evaluated = [(m["iteration"], m["spirals/accuracy"]) for m in lines if "spirals/accuracy" in m]
    assert [i for i, _ in evaluated] == [299, 599] and evaluated[-1][1] == results["spirals"]["accuracy"]
    assert (tmp_path / "model_final.pth").exists()

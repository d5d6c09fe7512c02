"""Running the tools as a user does, and reading what they leave behind (shared by the tests of tools/)."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/digits/mlp.yaml"
SHORT_RUN = [
    "SOLVER.LOG_PERIOD", "10", "SOLVER.CHECKPOINT_PERIOD", "20", "TEST.EVAL_PERIOD", "20",
    "SOLVER.WARMUP_ITERS", "10", "DATALOADER.NUM_WORKERS", "0",
]
LOGGED_60 = [9, 19, 29, 39, 49, 59]
LOGGED_80 = LOGGED_60 + [69, 79]


def run_tool(script, *args, expect_success=True):
    """Runs ``python tools/<script> *args`` from the repository root with one intra-op thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, f"tools/{script}", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    if expect_success and proc.returncode != 0:
        pytest.fail(f"{script} {' '.join(args)} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(output_dir):
    with open(Path(output_dir) / "metrics.json") as f:
        return [json.loads(line) for line in f]


def logged_classification(output):
    """The results of the last evaluation a tool logged (ClassificationEvaluator's log line, full precision)."""
    found = re.findall(r"Classification on digits_test over 359 samples: (\{.*\})", output)
    assert found, f"no evaluation logged in:\n{output[-3000:]}"
    return ast.literal_eval(found[-1])


def train_evaluate_resume(script, root):
    """Trains 60 iterations, keeps a copy of the output folder, evaluates model_final with --eval-only, then
    resumes to 80 iterations. Returns the processes and folders."""
    out = root / "run"
    train = run_tool(script, "--config-file", CONFIG, *SHORT_RUN, "SOLVER.MAX_ITER", "60", "OUTPUT_DIR", str(out))
    after_60 = Path(shutil.copytree(out, root / "after_60"))
    evaluate = run_tool(
        script, "--config-file", CONFIG, "--eval-only",
        "MODEL.WEIGHTS", str(after_60 / "model_final.pth"), "OUTPUT_DIR", str(root / "eval"),
    )
    resume = run_tool(
        script, "--config-file", CONFIG, "--resume", *SHORT_RUN, "SOLVER.MAX_ITER", "80", "OUTPUT_DIR", str(out)
    )
    return SimpleNamespace(train=train, after_60=after_60, evaluate=evaluate, resume=resume, out=out)

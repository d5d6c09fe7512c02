"""The ported train_net.py of docs/migrating-from-detectron2.md runs: train, resume, evaluate."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "migrating-from-detectron2.md"


def _ported_script() -> str:
    text = PAGE.read_text()
    section = text[text.index("## A ported `tools/train_net.py`"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(script, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script), "--config-file", "configs/digits/mlp.yaml", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_the_ported_train_net_trains_resumes_and_evaluates(tmp_path):
    script = tmp_path / "train_net.py"
    script.write_text(_ported_script())
    out = tmp_path / "ported"
    common = ["DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "30",
              "OUTPUT_DIR", str(out)]
    _run(script, "SOLVER.MAX_ITER", "60", *common)
    first = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert first[-1]["iteration"] == 59 and "classification/top1" in first[-1]  # the final evaluation

    _run(script, "--resume", "SOLVER.MAX_ITER", "90", *common)
    lines = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    iterations = [m["iteration"] for m in lines if "total_loss" in m]
    assert iterations == [19, 39, 59, 79, 89]  # the resumed run continued at 60 and wrote no iteration twice
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == 89

    proc = _run(script, "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth"), *common)
    top1 = float(re.search(r"evaluation: .*'top1': ([0-9.]+)", proc.stdout).group(1))
    assert top1 == lines[-1]["classification/top1"] and top1 > 50.0

"""MODEL.COMPILE: a real inductor compilation of the digits MLP (tens of seconds on 2 busy cores, so one test
does it all), and the clear error of a machine without a C++ compiler (a real child process whose CXX names
no compiler).

Is a compiled run bit-exact when resumed? Inductor generates the same C++ for the same graph, and the CPU
kernels run the same instructions on the same data with one thread, so yes: the test checks it bit for bit.
Against eager mode the compiled step is only close (fused kernels round differently).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from tests.engine.digits_runs import digits_cfg, train, weights
from trainkit.checkpoint import Checkpointer
from trainkit.modeling import build_model

REPO = Path(__file__).resolve().parents[2]
# 10 iterations, a checkpoint at 4, no evaluation (an eval-mode forward would be compiled too).
SHORT = ["SOLVER.MAX_ITER", "10", "SOLVER.CHECKPOINT_PERIOD", "5", "SOLVER.LOG_PERIOD", "5", "DATASETS.TEST", "()"]
COMPILE = ["MODEL.COMPILE", "True"]


def test_a_compiled_run_checkpoints_plain_weights_resumes_bit_exactly_and_trains_like_eager(tmp_path):
    counters.clear()
    compiled, _ = train(digits_cfg(tmp_path / "ref", *SHORT, *COMPILE))
    # Dynamo traced the model into a graph for inductor (torch's compile counters; no public API has them).
    # Without that, everything below would compare eager runs.
    assert counters["stats"]["unique_graphs"] >= 1

    # The file holds the plain module's keys, and loads into a plain model with equal tensors.
    saved = torch.load(tmp_path / "ref" / "model_final.pth", weights_only=True)["model"]
    assert not [key for key in saved if "_orig_mod" in key]
    plain = build_model(digits_cfg(tmp_path / "plain", *SHORT))
    Checkpointer(plain).load(str(tmp_path / "ref" / "model_final.pth"))
    trained = weights(compiled)
    assert plain.state_dict().keys() == trained.keys()
    assert all(torch.equal(plain.state_dict()[k], trained[k]) for k in trained)

    # Resumed from the middle checkpoint, the compiled run ends bit for bit where the uninterrupted one did.
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "ref" / "model_0000004.pth", tmp_path / "copy")
    (tmp_path / "copy" / "last_checkpoint").write_text("model_0000004.pth")
    resumed, _ = train(digits_cfg(tmp_path / "copy", *SHORT, *COMPILE), resume=True)
    assert resumed.start_iter == 5
    assert [k for k, v in weights(resumed).items() if not torch.equal(v, trained[k])] == []

    # And back: the plain model's weights (saved by an eager run) load into a compiled one.
    eager, _ = train(digits_cfg(tmp_path / "eager", *SHORT))
    Checkpointer(resumed.model).load(str(tmp_path / "eager" / "model_final.pth"))
    assert all(torch.equal(v, weights(eager)[k]) for k, v in weights(resumed).items())
    # The compiled steps computed what the eager ones did, up to rounding.
    for key, value in weights(eager).items():
        torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=1e-5)


def test_without_a_cpp_compiler_the_run_stops_at_start_naming_model_compile(tmp_path):
    # A child process: CXX names no compiler, and a fresh inductor cache so that nothing compiled before is
    # reused. DefaultTrainer must refuse at construction, before any training step.
    script = (
        "from tests.engine.test_defaults import digits_cfg\n"
        "from trainkit.engine import DefaultTrainer\n"
        f"cfg = digits_cfg({str(tmp_path / 'out')!r}, 'MODEL.COMPILE', 'True')\n"
        "try:\n"
        "    DefaultTrainer(cfg)\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', type(e).__name__, e)\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               TORCHINDUCTOR_COMPILE_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RAISED CompileUnavailableError torch.compile cannot compile on this machine" in done.stdout
    assert "needs a C++ compiler" in done.stdout
    assert "set MODEL.COMPILE False" in done.stdout
    assert not (tmp_path / "out" / "metrics.json").exists()

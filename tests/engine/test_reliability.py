"""Reliability of a DefaultTrainer run: bit-exact resume, preemption, crash safety, hostile input.

The acceptance tests of docs/reliability.md; each guarantee there names its test here.
"""
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from trainkit.checkpoint import CheckpointError, UnsafeCheckpointError
from trainkit.config import get_cfg
from trainkit.data import get_train_loader_seed
from trainkit.engine import DefaultTrainer, HookBase, hooks
from trainkit.modeling import MODEL_REGISTRY, MLPClassifier
from trainkit.utils.env import seed_all_rng

REPO = Path(__file__).resolve().parents[2]
CONVNET = str(REPO / "configs" / "digits" / "convnet.yaml")
MLP = str(REPO / "configs" / "digits" / "mlp.yaml")


def make_cfg(output_dir, config=CONVNET, **overrides):
    cfg = get_cfg()
    cfg.merge_from_file(config)
    opts = {
        "OUTPUT_DIR": str(output_dir),
        "SOLVER.MAX_ITER": 80,
        "SOLVER.CHECKPOINT_PERIOD": 40,
        "SOLVER.LOG_PERIOD": 10,
        "TEST.EVAL_PERIOD": 40,
        "DATALOADER.NUM_WORKERS": 0,
        "SOLVER.WARMUP_ITERS": 10,
    }
    opts.update(overrides)
    cfg.merge_from_list([x for kv in opts.items() for x in kv])
    return cfg


def final_weights(output_dir):
    return torch.load(os.path.join(output_dir, "model_final.pth"), weights_only=True)["model"]


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def losses_by_iteration(lines):
    return {line["iteration"]: {k: v for k, v in line.items() if "loss" in k} for line in lines}


class StopAt(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            self.trainer.request_stop("test stop")


def train(cfg, resume=False, seed=0, extra_hooks=()):
    seed_all_rng(seed)
    trainer = DefaultTrainer(cfg)
    trainer.register_hooks(list(extra_hooks))
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


@pytest.mark.parametrize("workers", [0, 2])
def test_stop_and_resume_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, workers):
    # Dropout (CONVNET.DROPOUT 0.25) and random shifts (INPUT.AUGMENT) are on in the convnet config.
    straight = make_cfg(tmp_path / "straight", **{"DATALOADER.NUM_WORKERS": workers})
    train(straight)

    interrupted = make_cfg(tmp_path / "interrupted", **{"DATALOADER.NUM_WORKERS": workers})
    first = train(interrupted, extra_hooks=[StopAt(39)])
    assert first.iter == 40 and first.stop_reason == "test stop"
    # The stopped run's last line is its last iteration: nothing is written for iteration 40, which never ran.
    assert metrics(tmp_path / "interrupted")[-1]["iteration"] == 39
    # A different global seed before resuming: the checkpoint's RNG states must win.
    second = train(interrupted, resume=True, seed=12345)
    assert second.start_iter == 40 and second.iter == 80

    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "interrupted")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = metrics(tmp_path / "straight"), metrics(tmp_path / "interrupted")
    assert [m["iteration"] for m in mb] == [m["iteration"] for m in ma]
    assert losses_by_iteration(mb) == losses_by_iteration(ma)


def test_a_negative_seed_resumes_with_the_interrupted_runs_data_seed(tmp_path):
    # SEED -1 draws the data seed (from NumPy's global RNG, seeded by train()): the uninterrupted run and the
    # first part draw the same one; the resumed part, seeded differently, must take it from the checkpoint.
    opts = {"SEED": -1, "MODEL.CONVNET.DROPOUT": 0.0}
    train(make_cfg(tmp_path / "straight", **opts))
    interrupted = make_cfg(tmp_path / "interrupted", **opts)
    train(interrupted, extra_hooks=[StopAt(39)])
    resumed = train(interrupted, resume=True, seed=12345)
    saved = torch.load(tmp_path / "interrupted" / "model_0000039.pth", weights_only=True)["trainer"]["data_seed"]
    assert get_train_loader_seed(resumed.data_loader) == saved
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "interrupted")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _run_tool(output_dir, *extra, max_iter=1500, resume=False):
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", CONVNET]
    if resume:
        cmd.append("--resume")
    cmd += ["SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "0",
            "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(output_dir), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def _wait_for_training(output_dir, timeout=60.0):
    # metrics.json appears at the first write (iteration 19): training is under way.
    deadline = time.monotonic() + timeout
    path = Path(output_dir) / "metrics.json"
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not start within {timeout} s")


def test_sigterm_saves_stops_and_resume_reaches_the_same_bitwise_end(tmp_path):
    reference = _run_tool(tmp_path / "reference")
    run = _run_tool(tmp_path / "run")
    _wait_for_training(tmp_path / "run")
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 0, out
    assert "Received SIGTERM" in out and "Run again with --resume to continue" in out
    tag = (tmp_path / "run" / "last_checkpoint").read_text()
    assert tag != "model_final.pth", "the signal came too late to test anything"

    resumed = _run_tool(tmp_path / "run", resume=True)
    out2, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out2
    stopped_at = int(tag[len("model_"):-len(".pth")])
    assert f"Resuming from iteration {stopped_at + 1}" in out2
    reference.communicate(timeout=180)
    assert reference.returncode == 0

    a, b = final_weights(tmp_path / "reference"), final_weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    iterations = [m["iteration"] for m in metrics(tmp_path / "run")]
    assert iterations == sorted(set(iterations))


def test_sigkill_at_random_moments_always_resumes_and_metrics_stay_parseable(tmp_path):
    rng = random.Random(0)
    out_dir = tmp_path / "run"
    # Checkpoints every 10 iterations: many kills land inside a save.
    extra = ("SOLVER.CHECKPOINT_PERIOD", "10")
    kills = 0
    for attempt in range(4):
        proc = _run_tool(out_dir, *extra, max_iter=600, resume=attempt > 0)
        try:
            _wait_for_training(out_dir)
            time.sleep(rng.uniform(0.0, 1.0))
        finally:
            proc.kill()
            out, _ = proc.communicate(timeout=30)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        assert "Traceback" not in out, out
        for line in (out_dir / "metrics.json").read_text().splitlines():
            json.loads(line)  # every line parses, even right after a kill
    assert kills >= 3
    final = _run_tool(out_dir, *extra, max_iter=600, resume=True)
    out, _ = final.communicate(timeout=180)
    assert final.returncode == 0, out
    assert "Resuming from iteration" in out
    iterations = [m["iteration"] for m in metrics(out_dir)]
    assert iterations == sorted(set(iterations)), "a resumed run duplicated iterations in metrics.json"
    assert iterations[-1] == 599

    reference = _run_tool(tmp_path / "reference", *extra, max_iter=600)
    reference.communicate(timeout=180)
    a, b = final_weights(tmp_path / "reference"), final_weights(out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- hostile and broken input ---------------------------------------------------------------------------------
@pytest.fixture
def mlp_cfg(tmp_path):
    return make_cfg(tmp_path / "out", config=MLP, **{"SOLVER.MAX_ITER": 20, "TEST.EVAL_PERIOD": 0})


def test_resume_without_checkpoint_starts_from_scratch_and_says_so(mlp_cfg, caplog):
    seed_all_rng(0)
    trainer = DefaultTrainer(mlp_cfg)
    with caplog.at_level(logging.INFO, logger="trainkit"):
        trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 0
    assert "no checkpoint" in caplog.text and "starting from scratch" in caplog.text


def test_weights_pointing_nowhere_name_the_file(mlp_cfg, tmp_path):
    mlp_cfg.MODEL.WEIGHTS = str(tmp_path / "missing.pth")
    trainer = DefaultTrainer(mlp_cfg)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        trainer.resume_or_load(resume=False)


def test_truncated_checkpoint_is_named_and_the_good_one_survives(mlp_cfg, tmp_path):
    trainer = train(mlp_cfg)
    good = tmp_path / "out" / "model_final.pth"
    before = good.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(before[: len(before) // 2])
    mlp_cfg.MODEL.WEIGHTS = str(bad)
    with pytest.raises(CheckpointError, match="truncated.pth.*not a valid checkpoint"):
        DefaultTrainer(mlp_cfg).resume_or_load(resume=False)
    assert good.read_bytes() == before
    del trainer


class _OpensAFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_carrying_code_is_refused_and_never_run(mlp_cfg, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _OpensAFile(marker)}, evil)
    mlp_cfg.MODEL.WEIGHTS = str(evil)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        DefaultTrainer(mlp_cfg).resume_or_load(resume=False)
    assert not marker.exists()


def test_checkpoint_of_another_model_lists_the_shape_mismatches(mlp_cfg, tmp_path, caplog):
    train(mlp_cfg)
    other = make_cfg(tmp_path / "other", config=MLP, **{"MODEL.MLP.HIDDEN_DIMS": [64, 64], "SOLVER.MAX_ITER": 5})
    other.MODEL.WEIGHTS = str(tmp_path / "out" / "model_final.pth")
    trainer = DefaultTrainer(other)
    with caplog.at_level(logging.WARNING):
        trainer.resume_or_load(resume=False)
    assert "shape" in caplog.text
    assert "(128, 64)" in caplog.text and "(64, 64)" in caplog.text


def test_unregistered_dataset_lists_the_registered_ones(mlp_cfg):
    mlp_cfg.DATASETS.TRAIN = ("digitz_train",)
    with pytest.raises(KeyError, match="digits_train"):
        DefaultTrainer(mlp_cfg)


@MODEL_REGISTRY.register()
class NaNAfter7Classifier(MLPClassifier):
    """The built-in MLP whose loss becomes NaN from its 8th training forward on."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = 0

    def forward(self, batch):
        out = super().forward(batch)
        if self.training:
            self.calls += 1
            if self.calls > 8:
                out = {k: v * float("nan") for k, v in out.items()}
        return out


def test_nan_loss_names_the_iteration_and_keeps_earlier_checkpoints(mlp_cfg, tmp_path):
    mlp_cfg.MODEL.META_ARCHITECTURE = "NaNAfter7Classifier"
    mlp_cfg.SOLVER.CHECKPOINT_PERIOD = 5
    with pytest.raises(FloatingPointError, match=r"iteration=8!"):
        train(mlp_cfg)
    out = tmp_path / "out"
    assert (out / "last_checkpoint").read_text() == "model_0000004.pth"
    weights = torch.load(out / "model_0000004.pth", weights_only=True)["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: CPU losses are checked every step")
def test_on_a_gpu_a_nan_loss_is_found_at_the_next_flush_and_no_checkpoint_holds_it(mlp_cfg, tmp_path):
    # LOG_PERIOD 20: the NaN of iteration 8 waits on the device; the checkpoint due after iteration 9 flushes
    # first, finds it, and is not written.
    mlp_cfg.MODEL.META_ARCHITECTURE = "NaNAfter7Classifier"
    mlp_cfg.MODEL.DEVICE = "cuda"
    mlp_cfg.SOLVER.CHECKPOINT_PERIOD = 5
    with pytest.raises(FloatingPointError, match=r"iteration=8!"):
        train(mlp_cfg)
    out = tmp_path / "out"
    assert (out / "last_checkpoint").read_text() == "model_0000004.pth"
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000004.pth"]


class RaiseAt(HookBase):
    def after_step(self):
        if self.trainer.iter == 14:
            raise RuntimeError("hook failed at 14")


def test_a_hook_that_raises_still_flushes_the_writers_and_propagates(mlp_cfg, tmp_path):
    with pytest.raises(RuntimeError, match="hook failed at 14"):
        train(mlp_cfg, extra_hooks=[RaiseAt()])
    lines = metrics(tmp_path / "out")
    # Written at iteration 9 by the period, and at 14 by after_train: nothing the run measured is lost.
    assert [m["iteration"] for m in lines] == [9, 14]
    assert all("total_loss" in m for m in lines)


def test_checkpoint_max_to_keep_keeps_the_newest_periodic_checkpoints_across_a_resume(tmp_path):
    cfg = make_cfg(tmp_path / "out", config=MLP, **{"SOLVER.MAX_ITER": 50, "SOLVER.CHECKPOINT_PERIOD": 10,
                                                   "SOLVER.CHECKPOINT_MAX_TO_KEEP": 2, "TEST.EVAL_PERIOD": 0})
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"a": torch.zeros(1)}, out / "model_0000001.pth")  # the user's file: never deleted
    train(cfg, extra_hooks=[StopAt(29)])
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000001.pth", "model_0000019.pth", "model_0000029.pth"]
    train(cfg, resume=True)
    assert sorted(p.name for p in out.glob("*.pth")) == [
        "model_0000001.pth", "model_0000039.pth", "model_0000049.pth", "model_final.pth"
    ]
    assert (out / "last_checkpoint").read_text() == "model_final.pth"

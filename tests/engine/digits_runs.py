"""Short DefaultTrainer runs on the digits data set, shared by the DefaultTrainer tests.

A module of its own (not a test module): a test module imported by another is imported twice under pytest
(as ``engine.test_x`` and ``tests.engine.test_x``), and a model it registers would then be registered twice.
"""
import json
from pathlib import Path

import torch

from trainkit.config import get_cfg
from trainkit.engine import DefaultTrainer
from trainkit.utils.env import seed_all_rng

__all__ = [
    "CONSTANT_LR", "MEASUREMENTS", "REPO", "RecordingAtEvaluation", "assert_same_weights", "digits_cfg",
    "read_metrics", "train", "weights", "without_timings",
]

REPO = Path(__file__).resolve().parents[2]

# A constant learning rate: the schedule then does not depend on MAX_ITER, so a run can be extended.
CONSTANT_LR = ["SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0"]


def digits_cfg(output_dir, *opts):
    """configs/digits/mlp.yaml, shortened: 40 iterations, writes every 10, checkpoints every 20, no periodic eval."""
    cfg = get_cfg()
    cfg.merge_from_file(str(REPO / "configs" / "digits" / "mlp.yaml"))
    cfg.merge_from_list(
        ["SOLVER.MAX_ITER", "40", "SOLVER.LOG_PERIOD", "10", "SOLVER.CHECKPOINT_PERIOD", "20",
         "SOLVER.WARMUP_ITERS", "10", "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0",
         "OUTPUT_DIR", str(output_dir), *opts]
    )
    return cfg


def train(cfg, trainer_cls=DefaultTrainer, *, resume=False, extra_hooks=()):
    """Seeds, builds the trainer, registers ``extra_hooks`` after the defaults, loads, trains."""
    seed_all_rng(cfg.SEED)
    trainer = trainer_cls(cfg)
    trainer.register_hooks(list(extra_hooks))
    trainer.resume_or_load(resume=resume)
    results = trainer.train()
    return trainer, results


MEASUREMENTS = (
    "time", "data_time", "eta_seconds", "memory/max_rss_mb", "memory/max_allocated_mb", "memory/max_reserved_mb"
)


def read_metrics(output_dir):
    with open(Path(output_dir) / "metrics.json") as f:
        return [json.loads(line) for line in f]


def without_timings(metrics):
    """The metrics.json lines without the wall-clock and memory entries, which differ from run to run."""
    return [{k: v for k, v in m.items() if k not in MEASUREMENTS} for m in metrics]


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


class RecordingAtEvaluation(DefaultTrainer):
    """Remembers the model's weights at each evaluation."""

    seen = []

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        cls.seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return super().test(cfg, model, evaluators)

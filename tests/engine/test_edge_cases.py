"""Edge cases of the training loop that a user hits with an unusual model or an unusual way of stopping.

Each test checks one behaviour that once went wrong: one-element losses of shape ``(1,)``, an empty loss dict,
and a non-finite loss that is only found by the final metric gather of a stopped run.
"""
import itertools
import json
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.tools.cli import CONFIG
from trainkit.config import get_cfg
from trainkit.engine import DefaultTrainer, HookBase, SimpleTrainer, hooks
from trainkit.utils.env import seed_all_rng
from trainkit.utils.events import JSONWriter


class ScaleModel(nn.Module):
    """One weight ``w`` (1.0 at first); for the batch ``x`` it returns losses ``w * x`` shaped as asked.

    The values are exact in float32 with SGD at lr 0.5, so tests can compare them with ``==``.
    """

    def __init__(self, make_losses):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.make_losses = make_losses

    def forward(self, x):
        return self.make_losses(self.w * x)


def scale_trainer(make_losses, **kwargs):
    model = ScaleModel(make_losses)
    return SimpleTrainer(model, itertools.repeat(torch.tensor(1.0)), torch.optim.SGD(model.parameters(), lr=0.5), **kwargs)


def series(trainer, name):
    return [value for value, _ in trainer.storage.history(name).values()]


def test_a_single_loss_of_shape_1_is_recorded_like_a_scalar_one():
    # detectron2 reads each loss with .item(), so a loss of shape (1,) works there; it must here too.
    trainer = scale_trainer(lambda y: {"loss": y.reshape(1)}, gather_metric_period=2)
    trainer.train(0, 3)
    # grad 1, lr 0.5: w = 1.0, 0.5, 0.0
    assert series(trainer, "loss") == [1.0, 0.5, 0.0]
    assert series(trainer, "total_loss") == [1.0, 0.5, 0.0]


def test_losses_of_shapes_1_and_scalar_mixed_are_recorded_with_their_sum():
    trainer = scale_trainer(lambda y: {"loss_a": y.reshape(1), "loss_b": 0.5 * y}, gather_metric_period=2)
    trainer.train(0, 3)
    # grad 1.5, lr 0.5: w = 1.0, 0.25, -0.5
    assert series(trainer, "loss_a") == [1.0, 0.25, -0.5]
    assert series(trainer, "loss_b") == [0.5, 0.125, -0.25]
    assert series(trainer, "total_loss") == [1.5, 0.375, -0.75]


def test_an_empty_loss_dict_is_a_value_error_that_says_what_the_model_must_return():
    trainer = scale_trainer(lambda y: {})
    with pytest.raises(ValueError, match=r"The model returned an empty dict of losses"):
        trainer.train(0, 2)


class StopAt(HookBase):
    """Requests a stop after iteration ``at`` (like a time-budget hook would)."""

    def __init__(self, at):
        self.at = at

    def after_step(self):
        if self.trainer.iter == self.at:
            self.trainer.request_stop("budget")


class AfterTrainLog(HookBase):
    def __init__(self, log):
        self.log = log

    def after_train(self):
        self.log.append(self.trainer.iter)


def test_a_nan_loss_stops_in_its_own_iteration_and_every_after_train_still_runs(tmp_path):
    # The loss is NaN at iteration 1. With period 20 no gather is due, but a CPU loss is checked in its own
    # iteration: training stops there, the hooks' after_train runs (the writer writes iteration 0 and closes
    # its file), then the FloatingPointError propagates.
    calls = iter(range(100))
    trainer = scale_trainer(
        lambda y: {"loss": y * float("nan") if next(calls) == 1 else y}, gather_metric_period=20
    )
    log = []
    writer = JSONWriter(str(tmp_path / "metrics.json"))
    trainer.register_hooks([StopAt(2), AfterTrainLog(log), hooks.PeriodicWriter([writer], period=20)])
    with pytest.raises(FloatingPointError, match=r"iteration=1!"):
        trainer.train(0, 10)
    assert log == [1]
    assert writer._file_handle is None  # closed
    lines = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [0]
    assert lines[0]["loss"] == 1.0


def test_default_trainer_a_nan_loss_stops_in_its_own_iteration_and_still_closes_and_restores(tmp_path):
    # The same through DefaultTrainer: BASE_LR 1e30 makes the loss of iteration 1 NaN (docs/reliability.md).
    cfg = get_cfg()
    cfg.merge_from_file(str(Path(__file__).resolve().parents[2] / CONFIG))
    cfg.merge_from_list([
        "SOLVER.MAX_ITER", 10, "SOLVER.BASE_LR", 1e30, "SOLVER.WARMUP_ITERS", 0, "SOLVER.LOG_PERIOD", 20,
        "SOLVER.CHECKPOINT_PERIOD", 100, "TEST.EVAL_PERIOD", 0, "DATALOADER.NUM_WORKERS", 0,
        "OUTPUT_DIR", str(tmp_path),
    ])
    seed_all_rng(cfg.SEED)
    handler_before = signal.getsignal(signal.SIGTERM)
    trainer = DefaultTrainer(cfg)
    log = []
    trainer.register_hooks([StopAt(2), AfterTrainLog(log)])
    with pytest.raises(FloatingPointError, match=r"iteration=1!"):
        trainer.train()
    assert log == [1]
    assert signal.getsignal(signal.SIGTERM) is handler_before  # PreemptionHandler.after_train ran
    lines = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    # The losses and lr of iteration 0 (the last good one) reach metrics.json; iteration 1 ended in its step.
    assert [(line["iteration"], "loss_cls" in line, "lr" in line) for line in lines] == [(0, True, True)]


class Sleeper(HookBase):
    def __init__(self, before_step, after_step):
        self.before, self.after = before_step, after_step

    def before_step(self):
        time.sleep(self.before)

    def after_step(self):
        time.sleep(self.after)


def test_iteration_timer_registered_first_times_the_other_hooks_before_step_but_not_their_after_step():
    # What the IterationTimer docstring and docs/hooks.md promise about registering it first.
    trainer = scale_trainer(lambda y: {"loss": y})
    trainer.register_hooks([hooks.IterationTimer(warmup_iter=0), Sleeper(before_step=0.05, after_step=0.5)])
    trainer.train(0, 2)
    times = series(trainer, "time")
    assert len(times) == 2 and all(0.05 <= t < 0.5 for t in times), times


@pytest.mark.parametrize("period", [0, -5])
def test_periodic_writer_with_a_period_below_1_is_a_value_error_naming_it(period):
    # It used to be accepted and to fail with ZeroDivisionError (or never write) once training ran.
    with pytest.raises(ValueError, match=rf"PeriodicWriter period must be >= 1 iteration, got {period}"):
        hooks.PeriodicWriter([], period=period)


def test_auto_scale_workers_keeps_periods_that_were_on_at_least_1():
    from trainkit.config import get_cfg
    from trainkit.engine import DefaultTrainer

    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.REFERENCE_WORLD_SIZE", "1", "SOLVER.IMS_PER_BATCH", "16",
                         "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "1"])
    scaled = DefaultTrainer.auto_scale_workers(cfg, 8)
    assert (scaled.SOLVER.CHECKPOINT_PERIOD, scaled.TEST.EVAL_PERIOD) == (1, 1)
    cfg.TEST.EVAL_PERIOD = 0
    assert DefaultTrainer.auto_scale_workers(cfg, 8).TEST.EVAL_PERIOD == 0

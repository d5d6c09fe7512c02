"""BestCheckpointer and EarlyStopping: the hooks that act on evaluation results.

Most tests run a SimpleTrainer whose EvalHook returns a scripted sequence of values (one per evaluation), so
the iterations that save or stop are known exactly; a few run DefaultTrainer on the digits config with its
real evaluation.
"""
import logging
import os
from pathlib import Path

import pytest
import torch

from tests.engine.test_train_loop import make_trainer
from tests.tools.cli import CONFIG, read_metrics
from tests.utils.test_events import trainkit_info_logs  # noqa: F401 (a pytest fixture used below)
from trainkit.checkpoint import Checkpointer
from trainkit.checkpoint.serialization import load_checkpoint_file
from trainkit.config import get_cfg
from trainkit.engine import DefaultTrainer, HookBase, hooks
from trainkit.utils.env import seed_all_rng
from trainkit.utils.events import get_event_storage

PERIOD = 3  # evaluations after iterations 2, 5, 8, 11, 14 (and after the last one)
MAX_ITER = 15
METRIC = "val/acc"


class ScriptedEval:
    """An eval function whose n-th call returns ``{"val": {"acc": values[n]}}``; records the iterations."""

    def __init__(self, values):
        self.values = list(values)
        self.iters = []

    def __call__(self):
        self.iters.append(get_event_storage().iter)
        return {"val": {"acc": self.values[len(self.iters) - 1]}}


class FileWatcher(HookBase):
    """After each step, records every new write of ``{save_dir}/{name}`` (atomic writes make a new inode) with
    the trainer's weights at that moment, and the content of the ``last_checkpoint`` tag."""

    def __init__(self, save_dir, name="model_best.pth"):
        self.path = os.path.join(save_dir, name)
        self.tag = os.path.join(save_dir, "last_checkpoint")
        self.writes = []  # (file content, the model's weights when the file was written)
        self.tags = []
        self._stat = None

    def _file_stat(self):
        st = os.stat(self.path) if os.path.exists(self.path) else None
        return st and (st.st_ino, st.st_mtime_ns)

    def before_train(self):
        self._stat = self._file_stat()  # a file from before this run is not one of its writes

    def after_step(self):
        stat = self._file_stat()
        if stat != self._stat:
            self._stat = stat
            if stat:
                weights = {k: v.clone() for k, v in self.trainer.model.state_dict().items()}
                self.writes.append((load_checkpoint_file(self.path), weights))
        self.tags.append(open(self.tag).read() if os.path.exists(self.tag) else None)

    def saved(self):
        """The (iteration, value) of each write."""
        return [(data["iteration"], data["val_metric_value"]) for data, _ in self.writes]


def scripted_trainer(tmp_path, values, *metric_hooks, period=PERIOD):
    """A SimpleTrainer with a checkpointer (of the model and the trainer), an EvalHook returning ``values``,
    then ``metric_hooks`` made by calling each with the checkpointer."""
    trainer = make_trainer()
    checkpointer = Checkpointer(trainer.model, str(tmp_path), trainer=trainer)
    evaluate = ScriptedEval(values)
    trainer.register_hooks([hooks.EvalHook(period, evaluate)] + [make(checkpointer) for make in metric_hooks])
    return trainer, checkpointer, evaluate


def best(mode="max"):
    return lambda checkpointer: hooks.BestCheckpointer(checkpointer=checkpointer, val_metric=METRIC, mode=mode)


def early(patience, mode="max", min_delta=0.0):
    return lambda checkpointer: hooks.EarlyStopping(METRIC, patience, mode, min_delta)


def watcher(tmp_path):
    return lambda checkpointer: FileWatcher(str(tmp_path))


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- Checkpointer.save(tag=False) ------------------------------------------------------------------------------
def test_checkpointer_save_with_tag_false_writes_the_file_and_leaves_the_tag_alone(tmp_path):
    checkpointer = Checkpointer(torch.nn.Linear(2, 1), str(tmp_path))
    assert checkpointer.save("side", tag=False, iteration=3) == str(tmp_path / "side.pth")
    assert load_checkpoint_file(str(tmp_path / "side.pth"))["iteration"] == 3
    assert not checkpointer.has_checkpoint()
    checkpointer.save("model_0000004", iteration=4)
    checkpointer.save("side", tag=False, iteration=5)
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000004.pth")
    assert load_checkpoint_file(str(tmp_path / "side.pth"))["iteration"] == 5


# ---- BestCheckpointer ------------------------------------------------------------------------------------------
def test_best_checkpointer_saves_exactly_at_the_improving_evaluations(tmp_path, trainkit_info_logs):
    values = [50.0, 60.0, 55.0, 70.0, 70.0]  # the last equals the best: not an improvement
    trainer, _, evaluate = scripted_trainer(tmp_path, values, best(), watcher(tmp_path))
    trainer.train(0, MAX_ITER)
    files = trainer._hooks[-1]
    assert evaluate.iters == [2, 5, 8, 11, 14]
    assert files.saved() == [(2, 50.0), (5, 60.0), (11, 70.0)]
    # The file holds the model of its iteration (not the final one), and the hook's state at that point.
    data, weights_then = files.writes[-1]
    assert_same_weights(data["model"], weights_then)
    assert not torch.equal(data["model"]["linear.weight"], trainer.model.linear.weight)
    assert data["val_metric"] == METRIC
    assert data["trainer"]["hooks"]["BestCheckpointer"] == {
        "val_metric": METRIC, "mode": "max", "best_metric": 70.0, "best_iter": 11
    }
    assert trainer._hooks[1].state_dict()["best_iter"] == 11
    messages = trainkit_info_logs.messages
    assert "BestCheckpointer: saved model_best.pth with val/acc = 50 at iteration 2." in messages
    assert (
        "BestCheckpointer: val/acc improved from 60 (iteration 5) to 70 at iteration 11; saved model_best.pth."
        in messages
    )
    assert (
        "BestCheckpointer: val/acc = 70 at iteration 14 is not better than the best, 70 at iteration 11; not saved."
        in messages
    )


def test_best_checkpointer_in_min_mode_saves_at_each_lower_value(tmp_path):
    trainer, _, _ = scripted_trainer(tmp_path, [0.5, 0.7, 0.4, 0.4, 0.1], best(mode="min"), watcher(tmp_path))
    trainer.train(0, MAX_ITER)
    assert trainer._hooks[-1].saved() == [(2, 0.5), (8, 0.4), (14, 0.1)]


def test_best_checkpointer_does_not_move_the_last_checkpoint_tag(tmp_path):
    # Periodic checkpoints after 4, 9, 14 (and model_final); best ones after 2, 5, 8, 11.
    def periodic(checkpointer):
        return hooks.PeriodicCheckpointer(checkpointer, period=5)

    values = [1.0, 2.0, 3.0, 4.0, 0.0]
    trainer, checkpointer, _ = scripted_trainer(tmp_path, values, periodic, best(), watcher(tmp_path))
    trainer.train(0, MAX_ITER)
    files = trainer._hooks[-1]
    assert files.saved() == [(2, 1.0), (5, 2.0), (8, 3.0), (11, 4.0)]
    assert files.tags == [None] * 4 + ["model_0000004.pth"] * 5 + ["model_0000009.pth"] * 5 + ["model_final.pth"]
    # Resuming picks the final checkpoint, not the best one.
    assert checkpointer.resume_or_load("")["iteration"] == 14


def test_best_checkpointer_skips_non_finite_values(tmp_path):
    values = [float("nan"), 5.0, float("inf"), 6.0, 6.0]
    trainer, _, _ = scripted_trainer(tmp_path, values, best(), watcher(tmp_path))
    trainer.train(0, MAX_ITER)
    assert trainer._hooks[-1].saved() == [(5, 5.0), (11, 6.0)]


def test_best_checkpointer_state_survives_a_resume_and_a_worse_model_does_not_replace_the_file(tmp_path):
    first, checkpointer, _ = scripted_trainer(tmp_path, [50.0, 70.0, 60.0], best())
    first.train(0, 9)
    checkpointer.save("model_0000008", iteration=8)  # after the evaluation at 8: the hook's state is in it

    second, checkpointer, evaluate = scripted_trainer(tmp_path, [65.0, 75.0], best(), watcher(tmp_path))
    start_iter = checkpointer.resume_or_load("")["iteration"] + 1
    hook = second._hooks[1]
    assert (hook.best_metric, hook.best_iter) == (70.0, 5)
    second.train(start_iter, MAX_ITER)
    assert evaluate.iters == [11, 14]
    assert second._hooks[-1].saved() == [(14, 75.0)]  # 65 at 11 is worse than the 70 saved by the first run


def test_resuming_a_finished_run_checks_the_evaluation_of_the_final_model(tmp_path):
    # No iteration left: the EvalHook evaluates in after_train; the file is the model of the last iteration.
    trainer, _, evaluate = scripted_trainer(tmp_path, [80.0], best())
    trainer.train(MAX_ITER, MAX_ITER)
    assert evaluate.iters == [MAX_ITER]
    data = load_checkpoint_file(str(tmp_path / "model_best.pth"))
    assert (data["iteration"], data["val_metric_value"]) == (MAX_ITER - 1, 80.0)


def test_best_checkpointer_ignores_a_saved_state_of_another_metric(tmp_path, caplog):
    checkpointer = Checkpointer(torch.nn.Linear(1, 1), str(tmp_path))
    hook = hooks.BestCheckpointer(checkpointer=checkpointer, val_metric="val/loss", mode="min")
    state = hooks.BestCheckpointer(checkpointer=checkpointer, val_metric=METRIC).state_dict()
    state.update(best_metric=70.0, best_iter=5)
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        hook.load_state_dict(state)
    assert (hook.best_metric, hook.best_iter) == (None, None)
    assert "follows 'val/acc' (mode max), this hook follows 'val/loss' (mode min)" in caplog.text


def _best_with_deprecated_period(metric):
    def make(checkpointer):
        with pytest.deprecated_call(match=r"BestCheckpointer\(eval_period=...\) is deprecated.*Leave eval_period out"):
            return hooks.BestCheckpointer(PERIOD, checkpointer, metric)  # detectron2's form
    return make


def test_an_unknown_metric_warns_once_naming_the_available_ones_and_training_goes_on(tmp_path, caplog):
    # With the deprecated eval_period, the warning comes at the first evaluation.
    trainer, _, evaluate = scripted_trainer(tmp_path, [1.0] * 5, _best_with_deprecated_period("val/accuracy"))
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        trainer.train(0, MAX_ITER)
    assert trainer.iter == MAX_ITER and len(evaluate.iters) == 5
    warnings = [r.getMessage() for r in caplog.records if "val/accuracy" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        "BestCheckpointer: no metric 'val/accuracy' in the storage after the evaluation at iteration 2; available: "
        "['data_time', 'loss_l1', 'loss_mse', 'total_loss', 'val/acc']."
    )
    assert not (tmp_path / "model_best.pth").exists()


def test_without_eval_period_an_unknown_metric_warns_once_at_the_end_naming_the_available_ones(tmp_path, caplog):
    trainer, _, evaluate = scripted_trainer(
        tmp_path, [1.0] * 5, lambda c: hooks.BestCheckpointer(checkpointer=c, val_metric="val/accuracy"),
    )
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        trainer.train(0, MAX_ITER)
    assert trainer.iter == MAX_ITER and len(evaluate.iters) == 5
    warnings = [r.getMessage() for r in caplog.records if "val/accuracy" in r.getMessage()]
    assert warnings == [
        "BestCheckpointer: no value of 'val/accuracy' was put during training; available: ['data_time', 'loss_l1', "
        "'loss_mse', 'total_loss', 'val/acc']. Check the name (the flattened result, such as 'classification/top1') "
        "and register this hook after the EvalHook."
    ]
    assert not (tmp_path / "model_best.pth").exists()


@pytest.mark.parametrize("deprecated_period", [True, False], ids=["with eval_period", "without"])
def test_a_hook_registered_before_the_eval_hook_warns_instead_of_reading_stale_values(
    tmp_path, caplog, deprecated_period
):
    trainer = make_trainer()
    checkpointer = Checkpointer(trainer.model, str(tmp_path), trainer=trainer)
    evaluate = ScriptedEval([1.0, 2.0, 3.0])
    if deprecated_period:
        best_hook = _best_with_deprecated_period(METRIC)(checkpointer)
    else:
        best_hook = hooks.BestCheckpointer(checkpointer=checkpointer, val_metric=METRIC)
    trainer.register_hooks([best_hook, hooks.EvalHook(PERIOD, evaluate)])
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        trainer.train(0, 9)
    assert "register this hook after the EvalHook" in caplog.text
    assert not (tmp_path / "model_best.pth").exists()  # later it only ever saw the previous evaluation's value


@pytest.mark.parametrize("deprecated_period", [True, False], ids=["with eval_period", "without"])
def test_the_deprecated_eval_period_saves_at_the_same_evaluations(tmp_path, deprecated_period):
    make = _best_with_deprecated_period(METRIC) if deprecated_period else best()
    trainer, _, _ = scripted_trainer(tmp_path, [50.0, 60.0, 55.0, 70.0, 65.0], make, watcher(tmp_path))
    trainer.train(0, MAX_ITER)
    assert trainer._hooks[-1].saved() == [(2, 50.0), (5, 60.0), (11, 70.0)]


# ---- EarlyStopping ---------------------------------------------------------------------------------------------
def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path, trainkit_info_logs):
    # 60.05 beats 60 by less than min_delta, so it is not an improvement.
    values = [50.0, 60.0, 60.05, 59.0, 80.0]
    trainer, _, evaluate = scripted_trainer(tmp_path, values, early(patience=2, min_delta=0.1))
    trainer.train(0, MAX_ITER)
    assert evaluate.iters == [2, 5, 8, 11]
    assert trainer.iter == 12 and trainer.model.calls == 12
    reason = "early stopping: val/acc did not improve by more than 0.1 in 2 evaluations (best: 60 at iteration 5)"
    assert trainer.stop_reason == reason
    assert f"EarlyStopping: stopping after iteration 11: {reason}." in trainkit_info_logs.messages
    assert (
        "EarlyStopping: val/acc = 60.05 at iteration 8 is no improvement of more than 0.1 over the best "
        "(60 at iteration 5); 1 of 2 evaluations without improvement." in trainkit_info_logs.messages
    )
    assert trainer._hooks[-1].state_dict() == {
        "val_metric": METRIC, "mode": "max", "best_metric": 60.0, "best_iter": 5, "num_bad_evals": 2
    }


def test_early_stopping_in_min_mode_and_an_improvement_resets_the_count(tmp_path):
    values = [1.0, 1.5, 0.9, 0.95, 0.9, 2.0]
    trainer, _, _ = scripted_trainer(tmp_path, values, early(patience=2, mode="min"))
    trainer.train(0, 20)
    # Bad evaluations at 5 (count 1), 11 and 14 (count 2: stop); 8 improved and reset the count.
    assert trainer.iter == 15 and trainer.stop_reason.endswith("in 2 evaluations (best: 0.9 at iteration 8)")


def test_early_stopping_does_not_stop_while_the_metric_improves(tmp_path):
    trainer, _, evaluate = scripted_trainer(tmp_path, [1.0, 2.0, 3.0, 4.0, 5.0], early(patience=1))
    trainer.train(0, MAX_ITER)
    assert trainer.iter == MAX_ITER and trainer.stop_reason is None and len(evaluate.iters) == 5


def test_early_stopping_counts_nan_as_no_improvement(tmp_path):
    trainer, _, _ = scripted_trainer(tmp_path, [float("nan"), float("nan"), 1.0, 1.0, 1.0], early(patience=2))
    trainer.train(0, MAX_ITER)
    assert trainer.iter == 6
    assert trainer.stop_reason == "early stopping: val/acc did not improve by more than 0 in 2 evaluations (best: none)"


def test_early_stopping_does_not_request_a_stop_at_the_last_iteration(tmp_path):
    trainer, _, _ = scripted_trainer(tmp_path, [5.0, 4.0, 3.0, 2.0, 1.0], early(patience=4))
    trainer.train(0, MAX_ITER)
    assert trainer.iter == MAX_ITER and trainer.stop_reason is None
    assert trainer._hooks[-1].num_bad_evals == 4


def test_early_stopping_count_continues_after_a_resume(tmp_path):
    first, checkpointer, _ = scripted_trainer(tmp_path, [5.0, 4.0], early(patience=3))
    first.train(0, 6)
    checkpointer.save("model_0000005", iteration=5)
    second, checkpointer, evaluate = scripted_trainer(tmp_path, [4.5, 3.0, 9.0], early(patience=3))
    second.train(checkpointer.resume_or_load("")["iteration"] + 1, MAX_ITER)
    assert evaluate.iters == [8, 11]
    assert second.iter == 12 and second.stop_reason.endswith("in 3 evaluations (best: 5 at iteration 2)")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="maximum"), "EarlyStopping mode must be 'max' (higher is better) or 'min' (lower is better), got "
                               "'maximum'"),
        (dict(patience=0), "EarlyStopping patience must be a number of evaluations >= 1, got 0"),
        (dict(min_delta=-0.5), "EarlyStopping min_delta must be >= 0 (an improvement margin), got -0.5"),
        (dict(eval_period=-1), "EarlyStopping eval_period must be the EvalHook's period (an int >= 0, e.g. "
                               "cfg.TEST.EVAL_PERIOD), got -1"),
    ],
)
def test_early_stopping_rejects_bad_arguments_naming_them(kwargs, message):
    args = {"val_metric": METRIC, "patience": 2, **kwargs}
    with pytest.raises(ValueError) as info:
        hooks.EarlyStopping(**args)
    assert str(info.value) == message + "."


def test_best_checkpointer_rejects_a_bad_mode():
    with pytest.raises(ValueError, match=r"BestCheckpointer mode must be 'max' .* got 'best'"):
        hooks.BestCheckpointer(checkpointer=Checkpointer(torch.nn.Linear(1, 1)), val_metric=METRIC, mode="best")


# ---- with DefaultTrainer on the digits data --------------------------------------------------------------------
def digits_cfg(output_dir, *opts):
    """The digits MLP config: 40 iterations with a constant LR, evaluating and writing every 10, checkpoints every
    20."""
    cfg = get_cfg()
    cfg.merge_from_file(str(Path(__file__).resolve().parents[2] / CONFIG))
    cfg.merge_from_list([
        "SOLVER.MAX_ITER", 40, "SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "SOLVER.STEPS", (),
        "SOLVER.WARMUP_ITERS", 0, "SOLVER.LOG_PERIOD", 10, "SOLVER.CHECKPOINT_PERIOD", 20, "TEST.EVAL_PERIOD", 10,
        "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(output_dir), *opts,
    ])
    return cfg


def default_trainer(cfg, make_hooks):
    seed_all_rng(cfg.SEED)
    trainer = DefaultTrainer(cfg)
    trainer.register_hooks(make_hooks(trainer))
    return trainer


def test_default_trainer_keeps_the_model_of_its_best_evaluation(tmp_path):
    cfg = digits_cfg(tmp_path)
    trainer = default_trainer(
        cfg, lambda t: [hooks.BestCheckpointer(checkpointer=t.checkpointer, val_metric="classification/top1"), FileWatcher(str(tmp_path))]
    )
    assert type(trainer._hooks[-3]) is hooks.PeriodicWriter
    trainer.resume_or_load(resume=False)
    trainer.train()
    top1 = [(m["iteration"], m["classification/top1"]) for m in read_metrics(tmp_path) if "classification/top1" in m]
    assert [it for it, _ in top1] == [9, 19, 29, 39]
    improving = [(it, v) for i, (it, v) in enumerate(top1) if all(v > w for _, w in top1[:i])]
    files = next(h for h in trainer._hooks if isinstance(h, FileWatcher))
    assert files.saved() == improving and len(improving) >= 2
    for data, weights_then in files.writes:
        assert_same_weights(data["model"], weights_then)
    assert trainer.checkpointer.get_checkpoint_file() == str(tmp_path / "model_final.pth")


def test_default_trainer_stops_early_after_the_evaluation_that_used_up_the_patience(tmp_path):
    # No evaluation can beat the first by 100 percentage points: the second one uses up a patience of 1.
    cfg = digits_cfg(tmp_path)
    trainer = default_trainer(
        cfg, lambda t: [hooks.EarlyStopping("classification/top1", 1, min_delta=100)]
    )
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    metrics = read_metrics(tmp_path)
    first = next(m["classification/top1"] for m in metrics if m["iteration"] == 9)
    assert trainer.iter == 20
    assert trainer.stop_reason == (
        f"early stopping: classification/top1 did not improve by more than 100 in 1 evaluation "
        f"(best: {first:.5g} at iteration 9)"
    )
    assert [m["iteration"] for m in metrics if "total_loss" in m] == [9, 19]
    assert results["classification"]["top1"] == metrics[1]["classification/top1"]  # the last evaluation's
    files = os.listdir(tmp_path)
    assert "model_0000019.pth" in files and "model_final.pth" not in files  # a stopped run has no final model


def test_resuming_from_a_checkpoint_at_an_evaluation_continues_early_stopping_exactly(tmp_path):
    def make_hooks(trainer):
        return [hooks.EarlyStopping("classification/top1", 2, min_delta=100)]

    straight_cfg = digits_cfg(tmp_path / "straight")
    straight = default_trainer(straight_cfg, make_hooks)
    straight.resume_or_load(resume=False)
    straight.train()
    assert straight.iter == 30  # evaluations at 9 (the best), 19, 29 (the second without improvement)

    split = tmp_path / "split"
    first = default_trainer(
        digits_cfg(split, "SOLVER.MAX_ITER", 20), make_hooks
    )
    first.resume_or_load(resume=False)
    first.train()
    resumed = default_trainer(digits_cfg(split), make_hooks)
    resumed.resume_or_load(resume=True)
    resumed.train()
    assert resumed.iter == 30

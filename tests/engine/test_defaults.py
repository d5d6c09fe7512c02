"""DefaultTrainer end to end, in process, on the digits data set: subclassing, default hooks, evaluation,
resume, and auto_scale_workers.

Every run is short (20-50 iterations of the small MLP, no loader workers); runs that are compared bit for bit
are seeded the way ``default_setup`` seeds them (``seed_all_rng(cfg.SEED)`` before the trainer is built).
"""
import logging
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.engine.digits_runs import (
    CONSTANT_LR,
    assert_same_weights,
    digits_cfg,
    read_metrics,
    train,
    weights,
    without_timings,
)
from tests.engine.test_hooks import FailAt
from trainkit.config import get_cfg
from trainkit.data import DatasetCatalog, MetadataCatalog, load_digits
from trainkit.engine import DefaultTrainer, HookBase, hooks
from trainkit.evaluation import DatasetEvaluator, inference_on_dataset
from trainkit.modeling import MODEL_REGISTRY
from trainkit.utils.env import seed_all_rng
from trainkit.utils.logger import setup_logger

@pytest.fixture
def info_logs(caplog, monkeypatch):
    """caplog at INFO for trainkit's loggers (after the console setup that DefaultTrainer does on first use)."""
    setup_logger()
    monkeypatch.setattr(logging.getLogger("trainkit"), "propagate", True)
    caplog.set_level(logging.INFO, logger="trainkit")
    return caplog


# ---- a user's customisation: own model, optimizer, evaluator and hook ----------------------------------------
@MODEL_REGISTRY.register()
class LinearClassifierOfTestDefaults(nn.Module):
    """Linear digits classifier that counts its training forwards."""

    def __init__(self, cfg):
        super().__init__()
        self.linear = nn.Linear(64, cfg.MODEL.NUM_CLASSES)
        self.training_forwards = 0

    def forward(self, batch):
        logits = self.linear(batch["image"].flatten(1))
        if not self.training:
            return {"logits": logits}
        self.training_forwards += 1
        return {"loss_cls": F.cross_entropy(logits, batch["label"])}


class AccuracyEvaluator(DatasetEvaluator):
    """Top-1 accuracy under the task name "custom"; remembers every instance that evaluated."""

    used = []

    def reset(self):
        self.correct, self.total = 0, 0

    def process(self, inputs, outputs):
        self.correct += int((outputs["logits"].argmax(dim=1) == inputs["label"]).sum())
        self.total += len(inputs["label"])

    def evaluate(self):
        AccuracyEvaluator.used.append(self)
        return {"custom": {"acc": 100.0 * self.correct / self.total}}


class CustomTrainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        return AccuracyEvaluator()

    @classmethod
    def build_optimizer(cls, cfg, model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.0)
        optimizer.built_by = "CustomTrainer"
        return optimizer


class StepRecorder(HookBase):
    def __init__(self):
        self.points = []

    def before_train(self):
        self.points.append("before_train")

    def after_step(self):
        self.points.append(self.trainer.iter)

    def after_train(self):
        self.points.append("after_train")


def test_a_subclass_overrides_model_optimizer_and_evaluator_and_adds_a_hook(tmp_path):
    AccuracyEvaluator.used.clear()
    cfg = digits_cfg(
        tmp_path, "MODEL.META_ARCHITECTURE", "LinearClassifierOfTestDefaults", "TEST.EVAL_PERIOD", "20", *CONSTANT_LR
    )
    recorder = StepRecorder()
    seed_all_rng(cfg.SEED)
    trainer = CustomTrainer(cfg)
    initial = weights(trainer)
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=False)
    results = trainer.train()

    model = trainer.model
    assert type(model) is LinearClassifierOfTestDefaults and model.training_forwards == 40
    assert not torch.equal(initial["linear.weight"], model.linear.weight)
    assert type(trainer.optimizer) is torch.optim.AdamW and trainer.optimizer.built_by == "CustomTrainer"
    # A hook registered later still runs before the writer and the checkpointing hooks.
    assert trainer._hooks[-4] is recorder and type(trainer._hooks[-3]) is hooks.PeriodicWriter
    assert recorder.points == ["before_train", *range(40), "after_train"]
    # The evaluator ran at iterations 19 and 39, and its result is the final model's accuracy.
    assert len(AccuracyEvaluator.used) == 2
    expected = inference_on_dataset(model, DefaultTrainer.build_test_loader(cfg, "digits_test"), AccuracyEvaluator())
    assert set(results) == {"custom"} and results == expected
    metrics = read_metrics(tmp_path)
    assert [m["iteration"] for m in metrics] == [9, 19, 29, 39]
    assert [m["iteration"] for m in metrics if "custom/acc" in m] == [19, 39]
    assert metrics[-1]["custom/acc"] == results["custom"]["acc"]
    assert not any("classification/top1" in m for m in metrics)
    # The constant schedule runs on top of the custom optimizer: its LR, not SOLVER.BASE_LR, is logged.
    assert {m["lr"] for m in metrics} == {0.003}


# ---- default hooks -------------------------------------------------------------------------------------------
def test_default_hooks_are_timer_scheduler_eval_memory_writer_checkpointer_preemption_in_that_order(tmp_path):
    # The writer before the checkpointing hooks: a checkpoint at a write iteration comes after that write.
    trainer = DefaultTrainer(digits_cfg(tmp_path))
    assert [type(h) for h in trainer._hooks] == [
        hooks.IterationTimer,
        hooks.LRScheduler,
        hooks.EvalHook,
        hooks.TorchMemoryStats,
        hooks.PeriodicWriter,
        hooks.PeriodicCheckpointer,
        hooks.PreemptionHandler,
    ]
    # Hooks registered later run before the writer and the checkpointing hooks.
    extra = hooks.CallbackHook()
    trainer.register_hooks([extra])
    assert [type(h) for h in trainer._hooks[-4:]] == [
        hooks.CallbackHook,
        hooks.PeriodicWriter,
        hooks.PeriodicCheckpointer,
        hooks.PreemptionHandler,
    ]


def test_evaluation_runs_every_eval_period_and_after_the_last_iteration(tmp_path):
    cfg = digits_cfg(tmp_path, "SOLVER.MAX_ITER", "50", "TEST.EVAL_PERIOD", "20")
    trainer, results = train(cfg)
    metrics = read_metrics(tmp_path)
    assert [m["iteration"] for m in metrics] == [9, 19, 29, 39, 49]
    assert [m["iteration"] for m in metrics if "classification/top1" in m] == [19, 39, 49]
    # The final evaluation is on the line of the last iteration, equal to what train() returned and to a
    # fresh evaluation of the final model.
    assert set(results) == {"classification"}
    assert metrics[-1]["classification/top1"] == results["classification"]["top1"]
    assert metrics[-1]["classification/top5"] == results["classification"]["top5"]
    assert DefaultTrainer.test(cfg, trainer.model) == results


def test_eval_period_zero_evaluates_only_after_the_last_iteration(tmp_path):
    _, results = train(digits_cfg(tmp_path))
    metrics = read_metrics(tmp_path)
    assert [m["iteration"] for m in metrics if "classification/top1" in m] == [39]
    assert metrics[-1]["classification/top1"] == results["classification"]["top1"]


class RandomDrawingTrainer(DefaultTrainer):
    """Its evaluator draws from every global RNG, as careless user code might."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        class Drawing(AccuracyEvaluator):
            def process(self, inputs, outputs):
                torch.rand(100)
                np.random.rand(100)
                random.random()
                super().process(inputs, outputs)

        return Drawing()


def test_evaluation_does_not_change_the_randomness_of_training(tmp_path):
    opts = ["MODEL.MLP.DROPOUT", "0.5", "SOLVER.MAX_ITER", "20"]
    with_eval, _ = train(digits_cfg(tmp_path / "a", *opts, "TEST.EVAL_PERIOD", "5"), RandomDrawingTrainer)
    without, _ = train(digits_cfg(tmp_path / "b", *opts), RandomDrawingTrainer)
    assert [m["iteration"] for m in read_metrics(tmp_path / "a") if "custom/acc" in m] == [9, 19]
    assert_same_weights(weights(with_eval), weights(without))


# ---- evaluators ----------------------------------------------------------------------------------------------
NO_EVALUATOR_DATASET = "test_defaults_digits_regression"
if NO_EVALUATOR_DATASET not in DatasetCatalog:
    DatasetCatalog.register(NO_EVALUATOR_DATASET, lambda: load_digits("test"))
    MetadataCatalog.get(NO_EVALUATOR_DATASET).set(evaluator_type="regression")
UNTYPED_DATASET = "test_defaults_digits_untyped"
if UNTYPED_DATASET not in DatasetCatalog:
    DatasetCatalog.register(UNTYPED_DATASET, lambda: load_digits("test"))


@pytest.mark.parametrize("name, shown_type", [(NO_EVALUATOR_DATASET, "'regression'"), (UNTYPED_DATASET, "None")])
def test_build_evaluator_for_a_non_classification_dataset_says_how_to_provide_one(tmp_path, name, shown_type):
    with pytest.raises(NotImplementedError) as info:
        DefaultTrainer.build_evaluator(digits_cfg(tmp_path), name)
    message = str(info.value)
    assert f"No evaluator for dataset {name!r} (evaluator_type={shown_type})" in message
    assert "Override DefaultTrainer.build_evaluator" in message and "evaluators= to DefaultTrainer.test()" in message


def test_test_uses_the_given_evaluators_one_per_dataset(tmp_path):
    cfg = digits_cfg(tmp_path, "DATASETS.TEST", f"('{NO_EVALUATOR_DATASET}', 'digits_test')")
    model = DefaultTrainer.build_model(cfg)
    with pytest.raises(NotImplementedError):
        DefaultTrainer.test(cfg, model)
    first, second = AccuracyEvaluator(), AccuracyEvaluator()
    results = DefaultTrainer.test(cfg, model, evaluators=[first, second])
    assert list(results) == [NO_EVALUATOR_DATASET, "digits_test"]
    # Both data sets are the digits test split: the same accuracy, each from its own evaluator.
    assert results[NO_EVALUATOR_DATASET] == results["digits_test"] == {"custom": {"acc": 100.0 * first.correct / 359}}
    assert first.total == second.total == 359
    with pytest.raises(ValueError, match=r"test\(\) got 1 evaluators for 2 data sets .* pass one per data set"):
        DefaultTrainer.test(cfg, model, evaluators=[first])


# ---- resume_or_load ------------------------------------------------------------------------------------------
def test_resume_without_a_checkpoint_starts_from_scratch_and_says_so(tmp_path, info_logs):
    trainer = DefaultTrainer(digits_cfg(tmp_path))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 0
    assert f"--resume: no checkpoint in {str(tmp_path)!r}; starting from scratch." in info_logs.messages


def test_no_resume_ignores_the_checkpoint_in_output_dir_and_loads_model_weights(tmp_path):
    trained, _ = train(digits_cfg(tmp_path, "SOLVER.MAX_ITER", "20"))
    fresh = DefaultTrainer(digits_cfg(tmp_path, "SOLVER.MAX_ITER", "20"))
    initial = weights(fresh)
    fresh.resume_or_load(resume=False)
    assert fresh.start_iter == 0
    assert_same_weights(weights(fresh), initial)
    from_weights = DefaultTrainer(digits_cfg(tmp_path, "MODEL.WEIGHTS", str(tmp_path / "model_final.pth")))
    from_weights.resume_or_load(resume=False)
    assert from_weights.start_iter == 0
    assert_same_weights(weights(from_weights), weights(trained))


def test_resume_continues_after_the_checkpointed_iteration(tmp_path, info_logs):
    train(digits_cfg(tmp_path, "SOLVER.MAX_ITER", "20"))
    trainer = DefaultTrainer(digits_cfg(tmp_path))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 20
    assert "Resuming from iteration 20" in info_logs.messages
    trainer.train()
    assert [m["iteration"] for m in read_metrics(tmp_path)] == [9, 19, 29, 39]


def test_resuming_a_finished_run_evaluates_the_final_model(tmp_path):
    _, first = train(digits_cfg(tmp_path, "SOLVER.MAX_ITER", "20"))
    trainer, again = train(digits_cfg(tmp_path, "SOLVER.MAX_ITER", "20"), resume=True)
    assert trainer.start_iter == 20
    assert again == first


def test_training_n_then_resuming_to_2n_equals_training_2n_bit_for_bit(tmp_path):
    # Dropout and momentum make the comparison cover the RNG states and the optimizer state too.
    opts = ["MODEL.MLP.DROPOUT", "0.3", *CONSTANT_LR]
    straight, _ = train(digits_cfg(tmp_path / "straight", *opts))
    train(digits_cfg(tmp_path / "split", *opts, "SOLVER.MAX_ITER", "20"))
    resumed, _ = train(digits_cfg(tmp_path / "split", *opts), resume=True)
    assert resumed.start_iter == 20
    assert_same_weights(weights(resumed), weights(straight))
    # The smoothed losses continue too (the metric histories are part of the checkpoint). The split run
    # also evaluated at the end of its first part, iteration 19.
    split, straight_metrics = without_timings(read_metrics(tmp_path / "split")), without_timings(read_metrics(tmp_path / "straight"))
    assert "classification/top1" in split[1] and "classification/top1" not in straight_metrics[1]
    split[1] = {k: v for k, v in split[1].items() if not k.startswith("classification/")}
    assert split == straight_metrics


def test_resuming_from_a_middle_checkpoint_equals_the_uninterrupted_run_bit_for_bit(tmp_path):
    # The cosine schedule of the digits config; the copy resumes from model_0000019 with the same config.
    opts = ["MODEL.MLP.DROPOUT", "0.3"]
    reference, _ = train(digits_cfg(tmp_path / "ref", *opts))
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "ref" / "model_0000019.pth", tmp_path / "copy")
    (tmp_path / "copy" / "last_checkpoint").write_text("model_0000019.pth")
    resumed, _ = train(digits_cfg(tmp_path / "copy", *opts), resume=True)
    assert resumed.start_iter == 20
    assert_same_weights(weights(resumed), weights(reference))


def test_resuming_an_interrupted_run_rewrites_the_metrics_written_after_its_last_checkpoint_once(tmp_path):
    # The interrupted run wrote line 49 (and what it had of 50-52) after its last checkpoint (39).
    cfg = digits_cfg(tmp_path, "SOLVER.MAX_ITER", "60")
    with pytest.raises(RuntimeError, match="failed at 52"):
        train(cfg, extra_hooks=[FailAt(52)])
    train(cfg, resume=True)
    train(digits_cfg(tmp_path / "uninterrupted", "SOLVER.MAX_ITER", "60"))
    resumed, uninterrupted = read_metrics(tmp_path), read_metrics(tmp_path / "uninterrupted")
    assert [m["iteration"] for m in resumed] == [9, 19, 29, 39, 49, 59]
    assert without_timings(resumed) == without_timings(uninterrupted)


# ---- auto_scale_workers --------------------------------------------------------------------------------------
def scaling_cfg():
    cfg = get_cfg()
    cfg.merge_from_list(
        ["SOLVER.REFERENCE_WORLD_SIZE", "4", "SOLVER.IMS_PER_BATCH", "16", "SOLVER.BASE_LR", "0.1",
         "SOLVER.MAX_ITER", "1000", "SOLVER.STEPS", "(600, 801)", "SOLVER.WARMUP_ITERS", "100",
         "TEST.EVAL_PERIOD", "200", "SOLVER.CHECKPOINT_PERIOD", "500"]
    )
    return cfg


@pytest.mark.parametrize(
    "workers, batch, lr, max_iter, steps, warmup, eval_period, checkpoint_period",
    [
        (8, 32, 0.2, 500, (300, 400), 50, 100, 250),  # 801 / 2 = 400.5 rounds to even, as Python's round does
        (2, 8, 0.05, 2000, (1200, 1602), 200, 400, 1000),
        (1, 4, 0.025, 4000, (2400, 3204), 400, 800, 2000),
    ],
)
def test_auto_scale_workers_scales_batch_lr_and_schedule_linearly(
    workers, batch, lr, max_iter, steps, warmup, eval_period, checkpoint_period
):
    cfg = scaling_cfg()
    cfg.freeze()
    scaled = DefaultTrainer.auto_scale_workers(cfg, workers)
    s = scaled.SOLVER
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER, tuple(s.STEPS), s.WARMUP_ITERS) == (batch, lr, max_iter, steps, warmup)
    assert (scaled.TEST.EVAL_PERIOD, s.CHECKPOINT_PERIOD, s.REFERENCE_WORLD_SIZE) == (eval_period, checkpoint_period, workers)
    assert scaled.is_frozen()
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.REFERENCE_WORLD_SIZE == 4  # the input is untouched


def test_auto_scale_workers_leaves_the_config_alone_without_a_reference_or_at_the_reference_size():
    cfg = scaling_cfg()
    assert DefaultTrainer.auto_scale_workers(cfg, 4) is cfg
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 0
    assert DefaultTrainer.auto_scale_workers(cfg, 8) is cfg


def test_auto_scale_workers_rejects_a_batch_that_does_not_divide_by_the_reference_size():
    cfg = scaling_cfg()
    cfg.SOLVER.IMS_PER_BATCH = 18
    with pytest.raises(ValueError, match=r"SOLVER.IMS_PER_BATCH \(18\) must be divisible by SOLVER.REFERENCE_WORLD_SIZE \(4\)"):
        DefaultTrainer.auto_scale_workers(cfg, 8)


def test_default_trainer_scales_the_config_to_its_world_size(tmp_path):
    cfg = digits_cfg(tmp_path, "SOLVER.REFERENCE_WORLD_SIZE", "2")
    trainer = DefaultTrainer(cfg)  # one process: half the batch, twice the iterations
    assert (trainer.cfg.SOLVER.IMS_PER_BATCH, trainer.cfg.SOLVER.BASE_LR, trainer.max_iter) == (32, 0.05, 80)
    assert cfg.SOLVER.IMS_PER_BATCH == 64


@pytest.mark.parametrize("iteration", [-5, 2**60, 3.5, "12", None], ids=["negative", "huge", "fractional", "str", "missing"])
def test_resuming_from_a_checkpoint_with_a_bad_iteration_is_an_error_naming_the_file_and_the_field(tmp_path, iteration):
    from trainkit.checkpoint import CheckpointError
    from trainkit.checkpoint.serialization import atomic_save, load_checkpoint_file

    cfg = digits_cfg(tmp_path, "SOLVER.MAX_ITER", 10, "SOLVER.CHECKPOINT_PERIOD", 5)
    train(cfg)
    path = tmp_path / "model_0000004.pth"
    data = load_checkpoint_file(str(path))
    if iteration is None:
        del data["trainer"]["iteration"]
    else:
        data["trainer"]["iteration"] = iteration
    atomic_save(data, str(path))
    (tmp_path / "last_checkpoint").write_text(path.name)
    trainer = DefaultTrainer(cfg)
    with pytest.raises(CheckpointError) as info:
        trainer.resume_or_load(resume=True)
    assert f"Could not restore 'trainer' from '{path}'" in str(info.value)
    assert f"the trainer state's 'iteration' must be a whole number in [0, 2**53)" in str(info.value)
    assert f"got {iteration!r}" in str(info.value)


def test_resuming_from_a_weights_only_checkpoint_is_an_error_instead_of_a_fresh_optimizer(tmp_path):
    from trainkit.checkpoint import CheckpointError
    from trainkit.checkpoint.serialization import atomic_save, load_checkpoint_file

    cfg = digits_cfg(tmp_path, "SOLVER.MAX_ITER", 10)
    train(cfg)
    path = tmp_path / "model_final.pth"
    atomic_save({"model": load_checkpoint_file(str(path))["model"]}, str(path))
    trainer = DefaultTrainer(cfg)
    with pytest.raises(CheckpointError, match=r"Cannot resume from .*model_final.pth: it has no trainer state"):
        trainer.resume_or_load(resume=True)


@pytest.mark.parametrize(
    "key, value, shown",
    [("MODEL.MLP.HIDDEN_DIMS", "[64]", "MODEL.MLP.HIDDEN_DIMS: [128, 128] in the checkpoint, [64] now"),
     ("SOLVER.OPTIMIZER", "AdamW", "SOLVER.OPTIMIZER: 'SGD' in the checkpoint, 'AdamW' now")],
)
def test_resuming_with_another_architecture_or_optimizer_is_refused_naming_the_key(tmp_path, key, value, shown):
    from trainkit.checkpoint import CheckpointError

    train(digits_cfg(tmp_path, "SOLVER.MAX_ITER", 10))
    trainer = DefaultTrainer(digits_cfg(tmp_path, "SOLVER.MAX_ITER", 20, key, value))
    with pytest.raises(CheckpointError) as info:
        trainer.resume_or_load(resume=True)
    assert shown in str(info.value)
    assert "the model's architecture and the optimizer's type must stay as they were" in str(info.value)


def test_resuming_with_a_changed_config_logs_each_key_old_new_and_what_it_does(tmp_path, info_logs):
    train(digits_cfg(tmp_path, "SOLVER.MAX_ITER", 10))
    base_lr = digits_cfg(tmp_path).SOLVER.BASE_LR
    trainer, _ = train(digits_cfg(tmp_path, "SOLVER.MAX_ITER", 20, "SOLVER.BASE_LR", 0.5), resume=True)
    changed = [r.getMessage() for r in info_logs.records if r.getMessage().startswith("Resuming with a changed config")]
    assert changed == [
        f"Resuming with a changed config: SOLVER.BASE_LR: {base_lr!r} -> 0.5 (no effect: the LR scheduler's base LRs "
        "are restored from the checkpoint)",
        "Resuming with a changed config: SOLVER.MAX_ITER: 10 -> 20 (takes effect from the resumed iteration on (the "
        "schedule's shape is the new config's; its base LRs and position are the checkpoint's))",
    ]
    assert trainer.scheduler.base_lrs == [base_lr] * len(trainer.optimizer.param_groups)  # as the message says


# ---- the writers: default_writers and WRITERS -----------------------------------------------------------------
def test_default_writers_keeps_detectron2s_signature_and_writers(tmp_path):
    from trainkit.engine import default_writers
    from trainkit.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

    writers = default_writers(str(tmp_path / "out"), 100)
    assert [type(w) for w in writers] == [CommonMetricPrinter, JSONWriter, TensorboardXWriter]
    assert (tmp_path / "out").is_dir()


def test_writers_builds_the_named_writers_with_the_console_first(tmp_path):
    from trainkit.utils.events import CommonMetricPrinter, CSVWriter, JSONWriter

    trainer = DefaultTrainer(digits_cfg(tmp_path, "WRITERS", '["csv", "json", "console"]'))
    assert [type(w) for w in trainer.build_writers()] == [CommonMetricPrinter, CSVWriter, JSONWriter]


def test_an_unknown_writer_is_an_error_before_anything_is_built_and_at_build(tmp_path):
    from trainkit.engine import default_writers

    with pytest.raises(ValueError, match=r"unknown writer 'cvs' \(did you mean 'csv'\?\); the known writers are \["):
        DefaultTrainer(digits_cfg(tmp_path / "a", "WRITERS", '["json", "cvs"]'))
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match=r"unknown writer 'mlflw' \(did you mean 'mlflow'\?\)"):
        default_writers(str(tmp_path / "b"), 10, names=["mlflw"])

import logging

import pytest
import torch
from torch import nn

from trainkit.evaluation import DatasetEvaluator, DatasetEvaluators, inference_context, inference_on_dataset


class Recorder(DatasetEvaluator):
    """Records what it is given; returns a fixed result under ``task``."""

    def __init__(self, task="rec", value=1.0):
        self.task, self.value = task, value
        self.events = []

    def reset(self):
        self.events.append("reset")

    def process(self, inputs, outputs):
        self.events.append((inputs["x"].tolist(), outputs["y"].tolist(), outputs["grad"], outputs["training"]))

    def evaluate(self):
        self.events.append("evaluate")
        return {self.task: {"value": self.value}}


class Doubler(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))
        self.bn = nn.BatchNorm1d(1)

    def forward(self, batch):
        y = batch["x"] * self.w
        return {"y": y, "grad": y.requires_grad, "training": self.training}


def batches():
    return [{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0])}]


def test_feeds_every_batch_in_eval_mode_without_grad_and_returns_the_results():
    model, recorder = Doubler(), Recorder()
    results = inference_on_dataset(model, batches(), recorder)
    assert results == {"rec": {"value": 1.0}}
    assert recorder.events == ["reset", ([1.0, 2.0], [2.0, 4.0], False, False), ([3.0], [6.0], False, False), "evaluate"]
    assert model.training


def test_without_an_evaluator_it_only_runs_and_returns_empty_dict():
    model = Doubler().eval()
    assert inference_on_dataset(model, batches(), None) == {}
    assert not model.training


def test_a_list_of_evaluators_is_merged():
    results = inference_on_dataset(Doubler(), batches(), [Recorder("a", 1.0), Recorder("b", 2.0)])
    assert results == {"a": {"value": 1.0}, "b": {"value": 2.0}}


def test_duplicate_result_keys_are_an_error():
    evaluators = DatasetEvaluators([Recorder("a"), Recorder("a")])
    with pytest.raises(KeyError, match="'a' \\(Recorder is the second\\)"):
        evaluators.evaluate()


def test_base_evaluator_returns_none_which_becomes_empty_results():
    assert inference_on_dataset(Doubler(), batches(), DatasetEvaluator()) == {}


def test_inference_context_restores_each_submodule_mode_even_on_error():
    model = Doubler()
    model.bn.eval()
    with pytest.raises(RuntimeError, match="boom"):
        with inference_context(model):
            assert not model.training and not model.bn.training
            raise RuntimeError("boom")
    assert model.training and not model.bn.training


def test_logs_progress_with_eta_and_totals(caplog):
    caplog.set_level(logging.INFO, logger="trainkit.evaluation.evaluator")
    data = [{"x": torch.tensor([float(i)])} for i in range(8)]
    inference_on_dataset(Doubler(), data, None, log_period=0.0)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "Start inference on 8 batches"
    progress = [m for m in messages if m.startswith("Inference done")]
    assert [m.split(".")[0] for m in progress] == [f"Inference done {i}/8" for i in range(1, 9)]
    assert all("ETA=0:00:00." in m for m in progress)
    assert messages[-1].startswith("Total inference time: ") and "for 8 batches" in messages[-1]
    assert "on 1 processes" in messages[-1]


def test_iterables_without_len_are_fine(caplog):
    caplog.set_level(logging.INFO, logger="trainkit.evaluation.evaluator")
    recorder = Recorder()
    inference_on_dataset(Doubler(), iter(batches()), recorder, log_period=0.0)
    assert len(recorder.events) == 4
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "Start inference on an unknown number of batches"
    assert messages[1].startswith("Inference done 1/?.") and "ETA" not in messages[1]
